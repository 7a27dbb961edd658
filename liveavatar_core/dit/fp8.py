"""fp8 (e4m3) linear layers for the DiT: half the weight memory of bf16 and Hopper's fp8
matrix units (`torch._scaled_mm`).

Weights are stored as float8_e4m3fn with one float32 scale per tensor (ComfyUI's "scaled fp8"
files hold exactly this: `<layer>.weight` in fp8 and `<layer>.scale_weight`), so those files
load without upcasting. Activations are quantised at run time with one scale per tensor by
default (cuBLAS's fast fp8 kernels); `set_activation_scaling_(model, "row")` gives each token
its own scale instead, which keeps outliers in one token from flattening the others, and
`set_activation_scaling_(model, "static")` fixes each layer's input scale after its first
call(s) (see `Fp8Linear`), so no call measures its input any more and the cast to e4m3 can
happen inside the kernel that produces the input (`quantize_input`, `Fp8Activation`).

As in LiveAvatar's own fp8 mode, the layers that set the conditioning stay in bf16: the text
and time embeddings, the time projection, the output head and the audio encoder's final
linear (`FP8_EXEMPT`). On devices without fp8 matrix units (CPUs, older GPUs) the weights are
dequantised per call: the same numbers, slower, which is what the tests check.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

FP8 = fused.FP8
FP8_MAX = fused.FP8_MAX  # 448
FP8_EXEMPT = re.compile(r"^(text_embedding|time_embedding|time_projection|head|casual_audio_encoder)\.")
# The marker tensor ComfyUI puts in its scaled-fp8 files.
SCALED_FP8_MARKER = "scaled_fp8"


@functools.lru_cache(maxsize=16)
def has_fp8_matmul(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs on `device` (compute capability 8.9 and up)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight -> (fp8 weight, float32 per-tensor scale) with weight ~= fp8 * scale."""
    scale = weight.detach().abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Activation(NamedTuple):
    """An input already in e4m3 with its float32 scale (input ~= data * scale), as made by
    `quantize_input` or a fused producer; fp8 layers take it in place of a tensor."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.scale).to(dtype)


# "tensor" (the default): one input scale per call, which runs cuBLAS's fp8 kernels; on an
# H200 a streaming block step took 192 ms this way against 274 ms with "row", a scale per
# token, for the same latents after one clip (0.033 from bf16 either way). "static": the
# scale of "tensor" measured over a layer's first calls, times a headroom, then fixed.
ACTIVATION_SCALINGS = ("row", "tensor", "static")
# e4m3 is a float format: a scale 4x too large loses no relative precision but for inputs
# below 1/7000 of the calibrated peak, while inputs up to 4x that peak still fit.
STATIC_HEADROOM = 4.0
# What layers not set by `set_activation_scaling_` use: LIVEAVATAR_FP8_SCALING=static turns the
# static scales on everywhere (calibrated on each layer's first call).
DEFAULT_SCALING = os.environ.get("LIVEAVATAR_FP8_SCALING", "tensor")
if DEFAULT_SCALING not in ACTIVATION_SCALINGS:
    raise ValueError(f"LIVEAVATAR_FP8_SCALING must be one of {', '.join(ACTIVATION_SCALINGS)}, got {DEFAULT_SCALING!r}")


def set_activation_scaling_(
    model: nn.Module, kind: str, calibration_calls: int = 1, headroom: float = STATIC_HEADROOM
) -> nn.Module:
    """How every fp8 layer of `model` scales its inputs: "tensor" (the default), "row" or
    "static" (each layer's scale taken from its first `calibration_calls` calls, times
    `headroom`, then frozen; choosing it again starts a new calibration)."""
    if kind not in ACTIVATION_SCALINGS:
        raise ValueError(f"activation scaling must be one of {ACTIVATION_SCALINGS}, got {kind!r}")
    if calibration_calls < 1 or headroom < 1:
        raise ValueError(
            f"static scaling needs calibration_calls >= 1 and headroom >= 1, got {calibration_calls} and {headroom}"
        )
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.activation_scaling = kind
            module.input_scale = None
            module.calibration_left = calibration_calls
            module.headroom = headroom
    return model


def static_scale(layer: nn.Module) -> torch.Tensor | None:
    """The frozen input scale of a "static" fp8 layer that runs fp8 matrix products, or None
    (another kind of layer or scaling, still calibrating, or a device without fp8 units)."""
    if not isinstance(layer, Fp8Linear) or layer.activation_scaling != "static" or layer.calibration_left:
        return None
    scale = layer.input_scale
    return scale if scale is not None and has_fp8_matmul(scale.device) else None


def quantize_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | Fp8Activation:
    """x cast to e4m3 once with `layer`'s frozen static scale (layers that see the same input,
    like q, k and v, can share it), or x itself where there is none (see `static_scale`)."""
    scale = static_scale(layer)
    return x if scale is None else Fp8Activation(fused.cast_fp8(x, scale), scale)


class Fp8Linear(nn.Module):
    """A linear layer with an fp8 weight [out, in] and a per-tensor scale (names as ComfyUI's
    scaled-fp8 files: `weight`, `scale_weight`, `bias`); inputs are scaled per tensor unless
    `activation_scaling` is "row" (per token) or "static".

    "static": the first `calibration_left` calls run as "tensor" and keep the largest input
    scale seen; from then on `input_scale` (that, times `headroom`) is fixed and inputs are
    only cast, one element-wise pass that a compiled producer can do itself. An input already
    quantised (`Fp8Activation`) is used with its own scale, in any mode."""

    activation_scaling = DEFAULT_SCALING
    input_scale: torch.Tensor | None = None
    calibration_left = 1 if DEFAULT_SCALING == "static" else 0
    headroom = STATIC_HEADROOM

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.scale_weight = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.compute_dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
        weight, scale = quantize_weight(linear.weight)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.scale_weight = nn.Parameter(scale.to(weight.device), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.float() * self.scale_weight).to(self.compute_dtype)

    def _calibrate(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x8, x_scale = fused.run(_quantize_tensor, rows)
        seen = x_scale if self.input_scale is None else torch.maximum(self.input_scale, x_scale)
        self.calibration_left -= 1
        if self.calibration_left:
            self.input_scale = seen
        else:
            self.input_scale = seen * self.headroom  # fixed from now on (a graph reads it by address)
        return x8, x_scale

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if isinstance(x, Fp8Activation):
            if not has_fp8_matmul(x.data.device) or self.in_features % 16 or self.out_features % 16:
                return F.linear(x.dequantize(self.compute_dtype), self.dequantized_weight(), self.bias)
            x8, x_scale = x.data.reshape(-1, self.in_features), x.scale
            return self._matmul(x8, x_scale, self.scale_weight, x.shape)
        x = x.to(self.compute_dtype)
        if not has_fp8_matmul(x.device) or self.in_features % 16 or self.out_features % 16:
            return F.linear(x, self.dequantized_weight(), self.bias)
        rows = x.reshape(-1, self.in_features)
        w_scale = self.scale_weight
        if self.activation_scaling == "row":
            x8, x_scale = fused.run(_quantize_rows, rows)
            w_scale = self.scale_weight.reshape(1, 1).expand(1, self.out_features).contiguous()
        elif self.activation_scaling == "static" and self.calibration_left:
            x8, x_scale = self._calibrate(rows)
        elif self.activation_scaling == "static":
            x_scale = self.input_scale
            x8 = fused.cast_fp8(rows, x_scale)
        else:
            x8, x_scale = fused.run(_quantize_tensor, rows)
        return self._matmul(x8, x_scale, w_scale, x.shape)

    def _matmul(self, x8, x_scale, w_scale, shape) -> torch.Tensor:
        out = torch._scaled_mm(
            x8, self.weight.t(), scale_a=x_scale, scale_b=w_scale, bias=self.bias, out_dtype=self.compute_dtype
        )
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def fp8_layer_names(model: nn.Module) -> list[str]:
    """The linear layers that run in fp8 (all but `FP8_EXEMPT`)."""
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not FP8_EXEMPT.match(name)
    ]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_dit_(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Turns the DiT's linear layers (but the exempt ones) into fp8 in place, one layer at a
    time on `device` (default: where each layer is), so the bf16 model never has to fit there."""
    dtype = next(model.parameters()).dtype
    for name in fp8_layer_names(model):
        linear = model.get_submodule(name)
        if device is not None:
            linear.to(device)
        _replace(model, name, Fp8Linear.from_linear(linear, dtype))
    if device is not None:
        model.to(device)
    return model


@torch.no_grad()
def dequantize_dit_(model: nn.Module) -> nn.Module:
    """Turns fp8 layers back into plain linear layers (for a LoRA merge, or a bf16 run of an
    fp8 file)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Fp8Linear):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                device=module.weight.device,
                dtype=module.compute_dtype,
            )
            linear.weight.copy_(module.dequantized_weight())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            _replace(model, name, linear.requires_grad_(False))
    return model


def has_fp8_layers(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def use_fp8_layers_(model: nn.Module, names: list[str]) -> None:
    """Swaps the named linear layers of a model built on the meta device for empty fp8 ones,
    before a scaled-fp8 file is loaded into it."""
    dtype = next(model.parameters()).dtype
    for name in names:
        linear = model.get_submodule(name)
        with torch.device("meta"):
            _replace(model, name, Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype))
