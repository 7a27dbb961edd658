"""Transformer block and output head of the S2V DiT, with per-segment timestep modulation.

A token sequence is made of segments (e.g. the noisy video, then the reference and motion
tokens) that carry different timesteps; `segments` gives their lengths and `modulation`
one [6, dim] (block) or [2, dim] (head) row per segment.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fp8, fused
from .layers import CrossAttention, LayerNorm32, SelfAttention


def segment_ids(segments: list[int], device) -> torch.Tensor | None:
    """Which modulation row each token takes ([L]), or None for a single segment."""
    if len(segments) == 1:
        return None
    return torch.repeat_interleave(torch.arange(len(segments), device=device), torch.tensor(segments, device=device))


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
        """x [B, L, C] float32 residual stream; modulation [B, S, 6, C] float32; segments:
        per-token segment ids from `segment_ids` (None: one segment)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float().unsqueeze(1) + modulation).unbind(2)
        dtype = self.modulation.dtype  # the linears' input dtype (their weights may be fp8)
        # q, k and v see the same input: one cast serves the three (their static scales agree).
        y = self.self_attn(self._modulated(x, shift1, scale1, segments, self.norm1, self.self_attn.q, dtype), rope, kv)
        x = fused.gated_residual(x, y, gate1, segments)
        x = fused.add_float(x, self.cross_attn(self._normed(x, dtype), context))
        y = self._ffn(self._modulated(x, shift2, scale2, segments, self.norm2, self.ffn[0], dtype))
        return fused.gated_residual(x, y, gate2, segments)

    # With static fp8 input scales (`fp8.static_scale`) the producers of the linears' inputs
    # write e4m3 themselves; otherwise these are the plain bf16 chains.
    @staticmethod
    def _modulated(x, shift, scale, segments, norm, consumer, dtype):
        input_scale = fp8.static_scale(consumer)
        if input_scale is None:
            return fused.norm_modulate(x, shift, scale, segments, norm.eps, dtype)
        return fp8.Fp8Activation(fused.norm_modulate_fp8(x, shift, scale, segments, norm.eps, input_scale), input_scale)

    def _normed(self, x, dtype):
        norm, input_scale = self.norm3, fp8.static_scale(self.cross_attn.q)
        if input_scale is None:
            return fused.layer_norm_affine(x, norm.weight, norm.bias, norm.eps, dtype)
        return fp8.Fp8Activation(
            fused.layer_norm_affine_fp8(x, norm.weight, norm.bias, norm.eps, input_scale), input_scale
        )

    def _ffn(self, x):
        input_scale = fp8.static_scale(self.ffn[2])
        if input_scale is None:
            return self.ffn(x)
        return self.ffn[2](fp8.Fp8Activation(fused.gelu_tanh_fp8(self.ffn[0](x), input_scale), input_scale))


class Head(nn.Module):
    """Final modulated norm and linear projection to patch pixels."""

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.norm = LayerNorm32(dim, eps)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, time_embedding, segments: list[int]):
        """time_embedding [B, S, C] float32 (one row per segment); segments: their lengths."""
        shift, scale = (self.modulation.float().unsqueeze(1) + time_embedding.unsqueeze(2)).unbind(2)
        ids = segment_ids(segments, x.device)
        return self.head(fused.norm_modulate(x, shift, scale, ids, self.norm.eps, self.head.weight.dtype))
