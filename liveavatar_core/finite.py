"""NaN/inf guards: a NaN number passes every min/max check (comparisons with NaN are false),
and a NaN weight or latent gives a black video without a word. These checks cost one
comparison or one reduction, at load time or once per run."""

from __future__ import annotations

import math

import torch

from .errors import InputError, LiveAvatarError


class NumericalError(LiveAvatarError):
    """The model produced NaN or infinite values."""


def require_finite(name: str, value, fix: str) -> None:
    """Raises InputError naming the input when `value` is not a finite number."""
    try:
        finite = math.isfinite(float(value))
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}. {fix}") from None
    if not finite:
        raise InputError(f"{name} is {value!r}, not a finite number. {fix}")


def check_latents_finite(latents: torch.Tensor, where: str) -> None:
    """Stops a run whose first latents are NaN/inf, before they are decoded into black frames."""
    if not bool(torch.isfinite(latents).all()):
        raise NumericalError(
            f"the model produced NaN or infinite values in {where}, so the video would be black. Causes: "
            "weights that overflow in this weight_dtype (try bf16 instead of fp16), a damaged or wrong "
            "diffusion model / LoRA file, or an extreme lora_strength or sample_guide_scale."
        )
