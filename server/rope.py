"""Rotary position embedding, in the half-split layout transformers' Llama uses.

Dimension i pairs with dimension i + D/2; the pair at position p turns by p * inv_freq[i].
The codec un-rotates keys (so tokens at different positions share one basis) and the
decoder rotates them back at their true positions, so both directions live here.
"""

from __future__ import annotations

import torch


def inv_freq_default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [N, D] for integer positions [N] (angles in float64, then float32)."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [N, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [N, D]
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: x [..., N, D], tables [N, D]."""
    return x * cos + _rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE (rotation by the negative angle)."""
    return x * cos - _rotate_half(x) * sin
