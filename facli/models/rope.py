"""Rotary position embeddings, with `rope_scaling` types linear and llama3."""

import math

import torch

from facli.models.config import ModelConfig, RopeScaling


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[D/2] float32 rotation rates, scaled as config.rope_scaling says."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for absolute positions, computed in float32 and cast to the model dtype."""

    def __init__(self, config: ModelConfig, device: torch.device):
        self.inv_freq = inverse_frequencies(config).to(device)

    def cos_sin(self, start, length: int, dtype: torch.dtype):
        """cos, sin for `length` positions from `start`: [length, D] when start is an int;
        [B, length, D] when it is a [B] device tensor, one start per sequence (CUDA-graph
        replays move it without recapturing)."""
        offsets = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        if isinstance(start, torch.Tensor):
            positions = start.to(torch.float32)[:, None] + offsets
        else:
            positions = offsets + start
        angles = positions[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
