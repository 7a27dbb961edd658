"""Filling a module built on the meta device with the tensors of a checkpoint, strictly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .errors import CheckpointError
from .tensor_files import TensorFile

SHOW_KEYS = 5


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Builds a module without allocating its parameters (they live on the meta device)."""
    with init_empty_weights(include_buffers=False):
        return factory()


def check_tensor_names(expected: dict[str, tuple[int, ...]], tensors: TensorFile, what: str, fix: str = "") -> None:
    """Raises one CheckpointError listing missing, unexpected and mis-shaped tensors."""
    found = set(tensors.keys())
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    misshaped = sorted(
        f"{k} {tensors.shape(k)} (expected {expected[k]})"
        for k in set(expected) & found
        if tuple(tensors.shape(k)) != tuple(expected[k])
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            problems.append(f"{len(items)} {label} tensor(s), e.g. {items[:SHOW_KEYS]}")
    if problems:
        hint = fix or f"Check that this file is a {what} checkpoint and that it downloaded completely."
        raise CheckpointError(f"{tensors.label}: does not match the {what}: " + "; ".join(problems) + f". {hint}")


def load_weights(
    module: nn.Module,
    tensors: TensorFile,
    *,
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keep_dtype: Callable[[str], bool] = lambda name: False,
    fix: str = "",
) -> nn.Module:
    """Loads every parameter and persistent buffer of `module` from `tensors`.

    Each tensor goes straight to `device` in `dtype` (floating tensors only; names for which
    `keep_dtype` is true keep the file's dtype), one at a time.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    check_tensor_names(expected, tensors, what, fix)
    for name in expected:
        value = tensors.get(name)
        keep = keep_dtype(name) or not value.is_floating_point() or dtype is None
        target = value.dtype if keep else dtype
        set_module_tensor_to_device(module, name, device, value=value, dtype=target)
    return module
