"""Perplexity as the perplexity tests expect it, from transformers' own model."""

import torch


def reference_nll(reference, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """Each window through transformers' model on its own; the tokens past the previous
    window's end are scored, as in transformers' perplexity guide."""
    total, count, scored_to, begin = 0.0, 0, 1, 0
    while True:
        end = min(begin + ctx, len(ids))
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            log_probs = torch.log_softmax(reference(window).logits[0].double(), dim=-1)
        for position in range(max(scored_to, begin + 1), end):
            total -= log_probs[position - begin - 1, ids[position]].item()
            count += 1
        scored_to = end
        if end == len(ids):
            return total, count
        begin += stride
