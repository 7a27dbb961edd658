"""Norms and attention layers of the Wan DiT (parameter names follow the official checkpoint)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .attention import attention
from .fp8 import Fp8Activation
from .fp8_attention import Fp8Heads


class RMSNorm(nn.Module):
    """RMS norm computed in float32, scaled in the input's dtype (as the official model does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class QKVProjection(nn.Module):
    """The q/k/v/o linears with RMS qk-norm shared by self-, cross- and audio attention."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)

    @property
    def dtype(self) -> torch.dtype:
        """What the linears take in (their weights may be stored in fp8)."""
        return self.norm_q.weight.dtype

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def _input(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor | Fp8Activation:
        return x if isinstance(x, Fp8Activation) else x.to(self.dtype)  # already cast for fp8 linears

    def project_q(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        return self._heads(self.norm_q(self.q(self._input(x))))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.dtype)
        return self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x.to(self.dtype))


class SelfAttention(QKVProjection):
    """Self-attention with 3-D RoPE.

    `kv(raw_keys, roped_keys, values)` lets a caller swap in the keys/values to attend to
    (streaming caches); it returns (keys, values) or (keys, values, mask), tensors or, from
    e4m3 caches read by fp8 attention, `Fp8Heads`.
    """

    def forward(self, x, rope, kv=None):
        x = self._input(x)
        _, q = fused.rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, self.num_heads, *rope)
        raw_k, k = fused.rms_norm_rope(self.k(x), self.norm_k.weight, self.norm_k.eps, self.num_heads, *rope)
        v = self._heads(self.v(x))
        mask = None
        if kv is not None:
            k, v, *rest = kv(raw_k, k, v)
            mask = rest[0] if rest else None
        k, v = (x if isinstance(x, Fp8Heads) else x.to(q.dtype) for x in (k, v))
        return self.output(attention(q, k, v, mask))


class CrossAttention(QKVProjection):
    """Attention from video tokens to a context (text tokens, or one frame's audio tokens)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.project_q(x)
        k, v = self.project_kv(context)
        return self.output(attention(q, k, v))
