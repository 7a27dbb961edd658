"""The one place where the DiT's attention runs, and the choice of kernel behind it.

Backends (the model's `Kernels.attention`, by default the environment variable
LIVEAVATAR_ATTENTION):
- "auto" (default): FlashAttention-3 when its package imports (`flash_attn_interface`, or the
  forward-only `fa3_fwd_interface` of the `fa3-fwd` wheel) and the device is a Hopper GPU,
  else PyTorch's `scaled_dot_product_attention` with its own pick (cuDNN on Hopper with
  recent PyTorch; the fused CPU kernel on CPUs).
- "sdpa": PyTorch's pick, never FlashAttention-3.
- "cudnn", "flash", "efficient", "math": PyTorch's SDPA held to that one kernel (an error where
  it cannot run the inputs).
- "fa3": FlashAttention-3, an error when it does not import.
- "fa3-fp8" (an option, never picked by "auto"): FlashAttention-3's fp8 forward, queries,
  keys and values in e4m3 with a scale per head (`fp8_attention`); keys and values that come
  in e4m3 (`Fp8Heads`, from the fp8 KV caches) are read as they are. An error when
  FlashAttention-3 does not import; tensors it cannot take (CPU) get its emulation.
- "fp8-emulated": the same e4m3 inputs dequantised and run through SDPA in float32: what
  "fa3-fp8" computes up to the kernel's rounding, on any device (slow: to check it).

Every backend computes softmax(q k^T / sqrt(d)) v over the same tokens; the others differ
only in rounding, the fp8 ones also by their e4m3 inputs. Masks (used by reference
computations in tests) always go to PyTorch's SDPA.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from . import kernels
from .fp8_attention import Fp8Heads, emulated_attention, kernel_attention, quantize_per_head

BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3", "fa3-fp8", "fp8-emulated")
FP8_BACKENDS = ("fa3-fp8", "fp8-emulated")  # those that take e4m3 keys/values as they are


def check_backend(name: str) -> None:
    """ValueError unless `name` is a backend that can run here (see the module docstring)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name in ("fa3", "fa3-fp8") and _fa3() is None:
        raise ValueError(
            f"attention backend {name!r} needs FlashAttention-3 (the flash_attn_interface package, "
            "or fa3_fwd_interface from the fa3-fwd wheel)"
        )


# FlashAttention-3's Python module: the upstream build's name, then the forward-only wheel's.
FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")


@functools.cache
def _fa3():
    for name in FA3_MODULES:
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError):  # OSError: a build whose CUDA or PyTorch libraries are missing
            continue
        return module.flash_attn_func
    return None


@functools.cache
def _sdpa_kernel(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def _fa3_runs_on(q: torch.Tensor) -> bool:
    """FlashAttention-3 imports and q lies on a Hopper GPU (the only one it is built for)."""
    return q.is_cuda and _fa3() is not None and torch.cuda.get_device_capability(q.device)[0] == 9


def _use_fa3(q: torch.Tensor, mask, backend: str) -> bool:
    if mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if backend == "fa3":
        return True
    return backend == "auto" and _fa3_runs_on(q)


def _fp8_attention(q, k, v, backend: str) -> torch.Tensor:
    q8, k8, v8 = (quantize_per_head(x) for x in (q, k, v))
    if backend == "fa3-fp8" and _fa3_runs_on(q):
        out = kernel_attention(_fa3(), q8, k8, v8)
    else:
        out = emulated_attention(q8, k8, v8)
    return out.to(q.dtype).flatten(2)


def attention(q: torch.Tensor, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over [B, L, heads, head_dim] tensors; returns [B, Lq, heads * head_dim] in q's
    dtype. k and v may be `Fp8Heads` (dequantised for the backends that do not read e4m3).
    `mask` [Lq, Lk] (True = may attend) is only used by reference computations in tests."""
    backend = kernels.current().attention
    if backend in FP8_BACKENDS and mask is None:
        return _fp8_attention(q, k, v, backend)
    k, v = (x.dequantize(q.dtype) if isinstance(x, Fp8Heads) else x for x in (k, v))
    if _use_fa3(q, mask, backend):
        out = _fa3()(q, k.to(q.dtype), v.to(q.dtype))
        out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
        return out.flatten(2)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if backend in ("auto", "sdpa", "fa3", *FP8_BACKENDS) or mask is not None:
        out = F.scaled_dot_product_attention(*args, attn_mask=mask)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_sdpa_kernel(backend)):
            out = F.scaled_dot_product_attention(*args)
    return out.transpose(1, 2).flatten(2)
