"""How a VAE runs, as options of one loaded VAE (`WanVAE.kernels`), not settings of the process.

Two `WanVAE`s in one process may run with different options; each call of a VAE puts its own
in force for that call only (cudnn.benchmark is set around the call and put back).

- `autotune` and `channels_last` pick other convolution kernels for the same arithmetic
  (cuDNN's timed choice; channels-last NDHWC activations and weights): on CUDA only.
- `autocast`: the network runs under `torch.autocast` in bf16 (or the weights' half dtype),
  as the official LiveAvatar code runs its VAE (bf16 weights under `amp.autocast(bf16)`: the
  convolutions in bf16, the RMS norms and what follows them up to the next convolution in
  float32). None, the default, turns it on where the weights are bf16/fp16 on a GPU, which
  reproduces the official precision; True also runs float32 weights in bf16 (faster, frames
  within about 1% of float32); False runs every op in the weights' dtype (the path before).
- `compile`: each per-frame call of the decoder and per-chunk call of the encoder compiled
  with `torch.compile` (`compile_backend`), so the norms, SiLUs, cache concatenations and
  paddings between convolutions fuse into few passes over memory. Off by default: the first
  clip compiles (about a minute on a GPU) and the fused kernels round differently (bf16).

Defaults come from the environment, read when a `VAEKernels` is made:
LIVEAVATAR_VAE_AUTOTUNE=0, LIVEAVATAR_VAE_CHANNELS_LAST=0, LIVEAVATAR_VAE_AUTOCAST=0/1 and
LIVEAVATAR_VAE_COMPILE=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def _env_flag(name: str, default: bool | None) -> bool | None:
    value = os.environ.get(name)
    return default if value is None else value != "0"


@dataclass(frozen=True)
class VAEKernels:
    autotune: bool = field(default_factory=lambda: _env_flag("LIVEAVATAR_VAE_AUTOTUNE", True))
    channels_last: bool = field(default_factory=lambda: _env_flag("LIVEAVATAR_VAE_CHANNELS_LAST", True))
    autocast: bool | None = field(default_factory=lambda: _env_flag("LIVEAVATAR_VAE_AUTOCAST", None))
    compile: bool = field(default_factory=lambda: _env_flag("LIVEAVATAR_VAE_COMPILE", False))
    compile_backend: str = "inductor"

    def autocast_dtype(self, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
        """The dtype to autocast to on `device` for weights of dtype `weights`, or None."""
        half = weights if weights in HALF_DTYPES else torch.bfloat16
        if self.autocast is None:
            return half if device.type == "cuda" and weights in HALF_DTYPES else None
        return half if self.autocast else None
