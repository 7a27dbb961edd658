"""3-D rotary position embedding of the Wan DiT, from explicit per-token (t, h, w) positions.

The official code looks positions up in a 1024-row table; computing the angles from the
positions gives the same values and also covers the long, rolling positions of streaming.
Negative temporal positions (motion frames, which lie in the past) are the conjugate rotation
in the official code, which is the same as a negative angle.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import fused


def axis_channels(head_dim: int) -> tuple[int, int, int]:
    """Complex channels given to (t, h, w): e.g. head_dim 128 -> (22, 21, 21)."""
    half = head_dim // 2
    return half - 2 * (half // 3), half // 3, half // 3


@functools.lru_cache(maxsize=32)
def _inv_freq(num_complex: int, device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    dim = 2 * num_complex
    return (1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)).to(device)


def rope_angles(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[L, 3] integer positions -> [L, head_dim // 2] rotation angles (float64, on the
    positions' device)."""
    parts = [
        positions[:, axis, None].double() * _inv_freq(n, positions.device)[None]
        for axis, n in enumerate(axis_channels(head_dim))
    ]
    return torch.cat(parts, dim=1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, 1, head_dim // 2] in float32, ready for `apply_rope`.

    Computed where they are used (float64 angles, as the official tables), so a GPU run
    neither waits on the host nor copies tables over at every call."""
    angles = rope_angles(positions.to(device), head_dim)
    return angles.cos().float().unsqueeze(1), angles.sin().float().unsqueeze(1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotates [B, L, heads, head_dim] by the tables of `rope_cos_sin` (pairs are adjacent channels)."""
    return fused.rope(x, *rope)


def sampled_axis(start: int, span: int, count: int) -> np.ndarray:
    """`count` integer positions spread over [start, start + span - 1], truncated like the
    official grid sampling (used when a coarse motion patch stands for several fine rows)."""
    return np.linspace(start, start + span - 1, count).astype(int)


def video_grid(first_frame: int, frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """[frames * height * width, 3] positions of a block of video tokens, made on `device`."""
    axes = (
        torch.arange(first_frame, first_frame + frames, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
    )
    return torch.stack([a.flatten() for a in torch.meshgrid(*axes, indexing="ij")], dim=1)


def grid_positions(t: np.ndarray | list[int], h: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """[len(t) * len(h) * len(w), 3] positions in (t, h, w) raster order."""
    tt, hh, ww = np.meshgrid(np.asarray(t), np.asarray(h), np.asarray(w), indexing="ij")
    return torch.from_numpy(np.stack([tt.ravel(), hh.ravel(), ww.ravel()], axis=1).astype(np.int64))
