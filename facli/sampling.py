"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator."""

from dataclasses import dataclass

import torch

from facli.errors import FacliError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise FacliError(f"expected --temperature >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FacliError(f"expected --top-p in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FacliError(f"expected --top-k >= 0 (0 keeps all tokens), got {self.top_k}")

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
        logits = logits / self.params.temperature
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
