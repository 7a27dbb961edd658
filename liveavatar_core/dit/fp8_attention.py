"""Attention in e4m3 with one scale per head, and its float32 emulation.

FlashAttention-3's fp8 forward takes e4m3 queries, keys and values with one float32 descale
per (batch, head) each; `Fp8Heads` is that pair. Queries are quantised at every call with the
amax of each head (a dynamic scale); keys and values either the same way, or come already in
e4m3 from the fp8 KV caches with the caches' own per-head scales (`streaming.caches`), which
the kernel then reads as they lie: no dequantised copy.

`emulated_attention` computes what the kernel computes from the same e4m3 inputs, dequantised
to float32 and run through PyTorch's SDPA: the fp8 kernel equals it up to its own rounding (it
also rounds the softmax probabilities to e4m3 and writes bf16), on any device.

Why a scale per head and not one per tensor: heads differ by orders of magnitude in their
key/value sizes; one scale for all puts the small heads among e4m3's subnormals. Why not a
scale per token: the kernel takes one descale per head for the whole key sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import fused

FP8 = fused.FP8
FP8_MAX = fused.FP8_MAX


class Fp8Heads(NamedTuple):
    """e4m3 queries/keys/values [B, L, heads, head_dim] and their float32 scales [B, heads]:
    x ~= data * scale (per batch row and head)."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.scale[:, None, :, None]).to(dtype)


def _head_scales(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=(1, 3)).float().clamp_min(1e-12) / FP8_MAX


def _quantize_with(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Saturating: e4m3fn has no infinity, and an unclamped overflow would become NaN.
    return (x.float() / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _head_scales(x)
    return _quantize_with(x, scale), scale


def head_scales(x: torch.Tensor, headroom: float = 1.0) -> torch.Tensor:
    """The per-head scales [B, heads] that map each head's amax to 448 / headroom."""
    return fused.run(_head_scales, x) * headroom


def quantize_with(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, head_dim] / scale [B, heads] in e4m3, saturating at +-448."""
    return fused.run(_quantize_with, x, scale)


def quantize_per_head(x: torch.Tensor | Fp8Heads) -> Fp8Heads:
    """x in e4m3 with its heads' amax as scales (an `Fp8Heads` is returned as it is)."""
    if isinstance(x, Fp8Heads):
        return x
    return Fp8Heads(*fused.run(_quantize_per_head, x))


def emulated_attention(q: Fp8Heads, k: Fp8Heads, v: Fp8Heads) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of the dequantised inputs, in float32: [B, Lq, heads, head_dim]."""
    out = F.scaled_dot_product_attention(*(x.dequantize(torch.float32).transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2)


def kernel_attention(flash_attn_func, q: Fp8Heads, k: Fp8Heads, v: Fp8Heads) -> torch.Tensor:
    """FlashAttention-3's fp8 forward on the e4m3 inputs, descaled per head: [B, Lq, heads, head_dim] bf16."""
    out = flash_attn_func(q.data, k.data, v.data, q_descale=q.scale, k_descale=k.scale, v_descale=v.scale)
    return out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
