"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator."""

from dataclasses import dataclass

import torch

from facli.units import check_count, check_number

SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes 64-bit seeds


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        check_number(self.temperature, "--temperature", low=0, note=" (0 is greedy)")
        check_number(self.top_p, "--top-p", low=0, high=1, low_open=True)
        check_count(self.top_k, "--top-k", low=0)
        check_count(self.seed, "--seed", low=0, high=SEED_LIMIT - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B] int64."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        # Shifted so the largest is 0 before scaling: a tiny temperature then sends the others
        # to -inf, never the largest to inf (whose softmax would be nan).
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / self.params.temperature
        if self.params.top_k:
            kth = torch.topk(logits, min(self.params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.params.top_p < 1:
            logits = _top_p_filter(logits, self.params.top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
