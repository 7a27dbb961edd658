"""Transformer block and output head of the S2V DiT, with per-segment timestep modulation.

A token sequence is made of segments (e.g. the noisy video, then the reference and motion
tokens) that carry different timesteps; `segments` gives their lengths and `modulation`
one [6, dim] (block) or [2, dim] (head) row per segment.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import CrossAttention, LayerNorm32, SelfAttention


def per_segment(x: torch.Tensor, rows: torch.Tensor, segments: list[int], fn) -> torch.Tensor:
    """Applies fn(part, row) to each segment of x [B, L, C] with its row [B, 1, C] of `rows`."""
    if len(segments) == 1:
        return fn(x, rows[:, :1])
    parts = x.split(segments, dim=1)
    return torch.cat([fn(part, rows[:, i : i + 1]) for i, part in enumerate(parts)], dim=1)


def modulate(x, shift, scale, segments):
    return per_segment(
        x, torch.stack([shift, scale], dim=2), segments, lambda p, r: p * (1 + r[:, :, 1]) + r[:, :, 0]
    )


def gate(x, gates, segments):
    return per_segment(x.float(), gates, segments, lambda p, r: p * r)


class S2VBlock(nn.Module):
    """Self-attention (3-D RoPE, qk-norm), text cross-attention and FFN, each modulated by
    the segment's timestep embedding (shift/scale/gate, 6 rows)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = LayerNorm32(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, modulation, segments, rope, context, kv=None):
        """x [B, L, C] float32 residual stream; modulation [B, S, 6, C] float32."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float().unsqueeze(1) + modulation).unbind(2)
        y = self.self_attn(modulate(self.norm1(x).float(), shift1, scale1, segments), rope, kv)
        x = x + gate(y, gate1, segments)
        x = x + self.cross_attn(self.norm3(x), context).float()
        ffn_in = modulate(self.norm2(x).float(), shift2, scale2, segments)
        y = self.ffn(ffn_in.to(self.ffn[0].weight.dtype))
        return x + gate(y, gate2, segments)


class Head(nn.Module):
    """Final modulated norm and linear projection to patch pixels."""

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.norm = LayerNorm32(dim, eps)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, time_embedding, segments):
        """time_embedding [B, S, C] float32 (one row per segment)."""
        shift, scale = (self.modulation.float().unsqueeze(1) + time_embedding.unsqueeze(2)).unbind(2)
        x = modulate(self.norm(x).float(), shift, scale, segments)
        return self.head(x.to(self.head.weight.dtype))
