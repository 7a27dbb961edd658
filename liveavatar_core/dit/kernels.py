"""How a DiT runs, as options of the model: kernel choices that do not change what it computes
(only rounding and speed), and the fp8 caches option.

Each `WanS2VTransformer` carries its own `Kernels` (`model.kernels`); its calls run under
`model.running()`, which puts them in force for that call only, so two models in one process
may run with different choices. Code below the model (`fused`, `attention`) reads
`current()`; outside a model's call it sees the defaults.

Defaults come from the environment, read when a `Kernels` is made: LIVEAVATAR_COMPILE=0
(eager element-wise chains), LIVEAVATAR_ATTENTION=<backend>, LIVEAVATAR_SINK_IN_PLACE=0/1 and
LIVEAVATAR_CUDA_GRAPHS=0/1 and LIVEAVATAR_KV_FP8=0/1 (see `streaming.causal_dit`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value != "0"


@dataclass(frozen=True)
class Kernels:
    # The element-wise chains of `fused` compiled on GPUs (torch.compile), or eager everywhere.
    compile_elementwise: bool = field(default_factory=lambda: os.environ.get("LIVEAVATAR_COMPILE", "1") != "0")
    # The attention kernel (see `attention`).
    attention: str = field(default_factory=lambda: os.environ.get("LIVEAVATAR_ATTENTION", "auto"))
    # The streaming DiT's options (see `streaming.causal_dit`); None: chosen from the device.
    sink_in_place: bool | None = field(default_factory=lambda: _env_flag("LIVEAVATAR_SINK_IN_PLACE"))
    cuda_graphs: bool = field(default_factory=lambda: bool(_env_flag("LIVEAVATAR_CUDA_GRAPHS")))
    # The one choice here that changes the numbers a little: the streaming caches on the device
    # in e4m3 with a scale per token and head (half their memory; see `streaming.caches`).
    kv_fp8: bool = field(default_factory=lambda: bool(_env_flag("LIVEAVATAR_KV_FP8")))

    def __post_init__(self):
        from .attention import check_backend

        check_backend(self.attention)


_current: contextvars.ContextVar[Kernels | None] = contextvars.ContextVar("liveavatar_kernels", default=None)


def current() -> Kernels:
    """The options of the model running now (the defaults outside any model's call)."""
    kernels = _current.get()
    return _defaults() if kernels is None else kernels


@functools.cache
def _defaults() -> Kernels:
    return Kernels()


@contextlib.contextmanager
def use(kernels: Kernels) -> Iterator[None]:
    """`kernels` in force for the block (in this thread or task only)."""
    token = _current.set(kernels)
    try:
        yield
    finally:
        _current.reset(token)
