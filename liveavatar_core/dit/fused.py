"""The element-wise work between the DiT's matrix products, one function per chain.

Written as plain PyTorch, which is what runs on the CPU and what the equality tests check. On
GPUs the same functions run compiled (`torch.compile`) unless the running model's
`Kernels.compile_elementwise` is off (see `kernels`); compiled, each chain
becomes one pass over memory instead of four to eight: at 14B size the float32 norm,
modulation, RoPE and gating passes otherwise cost about a fifth of a DiT call.

Segments: a token sequence may hold parts with different timesteps (video, then reference and
motion). `rows` tensors then carry one row per segment, [B, S, C], and `segment_ids` [L] says
which row each token takes (None when there is one segment).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import kernels

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _per_token(rows: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    return rows if segment_ids is None else rows[:, segment_ids]


def _norm_modulate(x, shift, scale, segment_ids, eps: float, dtype: torch.dtype):
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1 + _per_token(scale, segment_ids)) + _per_token(shift, segment_ids)).to(dtype)


def _cast_fp8(x, scale):
    # Saturating: e4m3fn has no infinity, and an unclamped overflow would become NaN.
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _norm_modulate_fp8(x, shift, scale, segment_ids, eps: float, input_scale):
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return _cast_fp8(normed * (1 + _per_token(scale, segment_ids)) + _per_token(shift, segment_ids), input_scale)


def _layer_norm_affine_fp8(x, weight, bias, eps: float, input_scale):
    return _cast_fp8(F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps), input_scale)


def _gelu_tanh_fp8(x, input_scale):
    return _cast_fp8(F.gelu(x.float(), approximate="tanh"), input_scale)


def _gated_residual(x, y, gate, segment_ids):
    return x + y.float() * _per_token(gate, segment_ids)


def _layer_norm_affine(x, weight, bias, eps: float, dtype: torch.dtype):
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(dtype)


def _rms_norm(x, weight, eps: float):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def _rope(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def _rms_norm_rope(x, weight, eps: float, num_heads: int, cos, sin):
    normed = _rms_norm(x, weight, eps).unflatten(-1, (num_heads, -1))
    return normed, _rope(normed, cos, sin)


def _add_float(x, y):
    return x + y.float()


@functools.cache
def _compiled(fn):
    # Shapes start static and only the dimensions seen to change (the token count) become
    # symbolic: widths and head sizes stay constants, which keeps the kernels' index
    # arithmetic cheap and their loads vectorised.
    return torch.compile(fn, dynamic=None, fullgraph=True)


def run(fn, x: torch.Tensor, *args):
    """fn(x, *args), compiled when x is on a GPU and the running model compiles."""
    if x.is_cuda and kernels.current().compile_elementwise:
        return _compiled(fn)(x, *args)
    return fn(x, *args)


def norm_modulate(x, shift, scale, segment_ids=None, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
    """layer_norm(x) * (1 + scale) + shift in float32, returned in `dtype` (the next linear's)."""
    return run(_norm_modulate, x, shift, scale, segment_ids, eps, dtype)


def cast_fp8(x, scale):
    """x / scale in e4m3, saturating at +-448 (scale: a float32 scalar tensor)."""
    return run(_cast_fp8, x, scale)


def norm_modulate_fp8(x, shift, scale, segment_ids=None, eps: float = 1e-6, input_scale=None):
    """`norm_modulate` cast straight to e4m3 with a fixed input scale: one pass, no bf16 copy."""
    return run(_norm_modulate_fp8, x, shift, scale, segment_ids, eps, input_scale)


def layer_norm_affine_fp8(x, weight, bias, eps: float, input_scale):
    """`layer_norm_affine` cast straight to e4m3 with a fixed input scale."""
    return run(_layer_norm_affine_fp8, x, weight, bias, eps, input_scale)


def gelu_tanh_fp8(x, input_scale):
    """The FFN's tanh GELU cast straight to e4m3 with a fixed input scale."""
    return run(_gelu_tanh_fp8, x, input_scale)


def gated_residual(x, y, gate, segment_ids=None):
    """x + y * gate, in float32 (the residual stream's precision)."""
    return run(_gated_residual, x, y, gate, segment_ids)


def layer_norm_affine(x, weight, bias, eps: float, dtype: torch.dtype):
    """An affine layer norm computed in float32 and returned in `dtype`."""
    return run(_layer_norm_affine, x, weight, bias, eps, dtype)


def rms_norm(x, weight, eps: float):
    """RMS norm computed in float32, scaled in the input's dtype (as the official model)."""
    return run(_rms_norm, x, weight, eps)


def rope(x, cos, sin):
    """Rotates [B, L, heads, head_dim] by cos/sin tables [L, 1, head_dim // 2] (pairs are
    adjacent channels), in float32, returned in x's dtype."""
    return run(_rope, x, cos, sin)


def rms_norm_rope(x, weight, eps: float, num_heads: int, cos, sin):
    """[B, L, C] -> (RMS-normed heads [B, L, heads, head_dim], the same rotated by RoPE)."""
    return run(_rms_norm_rope, x, weight, eps, num_heads, cos, sin)


def add_float(x, y):
    """x + y with y promoted to float32 (a residual add)."""
    return run(_add_float, x, y)
