"""Rotary position embeddings (M3), with the scaling variants checkpoints use.

RoPE rotates each (x_i, x_{i+d/2}) pair of a query or key by an angle proportional to the
token's position, so the dot product of a query and a key depends only on their distance.
lmforge uses the "rotate half" pairing of Hugging Face checkpoints; GGUF files store q/k
permuted for the interleaved pairing, and the GGUF loader undoes that permutation.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair rotation speeds, adjusted by the checkpoint's rope scaling (if any)."""
    # Explicit CPU: tables are computed eagerly even when the model is built on "meta".
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        # Position interpolation: positions are squeezed by `factor`, i.e. every frequency slows down.
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "factors":
        # Per-pair divisors stored explicitly (GGUF's rope_freqs tensor, e.g. Llama 3.1 files).
        factors = torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope factors have {factors.numel()} entries, expected {inv_freq.numel()}")
        return inv_freq / factors
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3, factors)")


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: slow down only the low frequencies (long wavelengths).

    Wavelengths shorter than original_context/high_freq_factor keep their speed (they
    encode local order); those longer than original_context/low_freq_factor are divided
    by `factor` (so the long context maps onto angles seen in training); in between, a
    linear blend of the two.
    """
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryTable(torch.nn.Module):
    """Cached cos/sin tables indexed by absolute position; grows on demand."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, initial_len: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta, scaling), persistent=False)
        self.register_buffer("cos", torch.empty(0, device="cpu"), persistent=False)
        self.register_buffer("sin", torch.empty(0, device="cpu"), persistent=False)
        self._build(initial_len)

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat((angles, angles), dim=-1)  # [T, head_dim]: the rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `positions` ([B, L] ints), shaped [B, 1, L, head_dim] to broadcast over heads."""
        needed = int(positions.max()) + 1
        if needed > self.cos.shape[0]:
            self._build(max(needed, 2 * self.cos.shape[0]))
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def slice(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the contiguous positions start..start+length, shaped [1, 1, L, head_dim]."""
        if start + length > self.cos.shape[0]:
            self._build(max(start + length, 2 * self.cos.shape[0]))
        cos, sin = self.cos[start : start + length], self.sin[start : start + length]
        return cos[None, None].to(dtype), sin[None, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of x [B, H, L, d] by the given angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
