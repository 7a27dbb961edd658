"""Merging LiveAvatar's LoRA (the distilled few-step student) into the S2V DiT.

LiveAvatar's training saves PEFT-style pairs `base_model.model.<module>.lora_A.weight` /
`lora_B.weight` (rank 128, alpha 64, targets `q,k,v,o,ffn.0,ffn.2` by suffix, so the audio
injector's attention too). Accepted variants: without the `base_model.model.` prefix, with
ComfyUI's `diffusion_model.` prefix, and with a PEFT adapter name (`lora_A.default.weight`).
Tensors that are not LoRA factors replace the base weight of the same name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .tensor_files import open_tensor_file, strip_prefix

LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
# alpha / rank of the released LiveAvatar LoRA (64 / 128); used when the file does not say.
DEFAULT_SCALE = 0.5
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.(?:lora_)?alpha$")


@dataclass
class LoraReport:
    merged: int  # LoRA pairs added into base weights
    replaced: int  # full tensors copied over base weights

    def __str__(self) -> str:
        return f"merged {self.merged} LoRA pairs, replaced {self.replaced} tensors"


@torch.no_grad()
def merge_lora(model: nn.Module, path: str | Path, strength: float = 1.0) -> LoraReport:
    """Adds `strength * alpha/rank * B @ A` to each targeted weight and copies plain tensors.

    Merging happens in float32 on the weight's device, then is cast back to its dtype.
    Raises CheckpointError when the file matches nothing in the model or a shape differs.
    """
    tensors = open_tensor_file(path)
    label = tensors.label
    params = dict(model.named_parameters())
    factors: dict[str, dict[str, str]] = {}
    alphas: dict[str, float] = {}
    plain: dict[str, str] = {}
    for name in tensors.keys():
        stripped = strip_prefix(name, LORA_PREFIXES)
        if m := _FACTOR.match(stripped):
            factors.setdefault(m["module"], {})[m["side"]] = name
        elif m := _ALPHA.match(stripped):
            alphas[m["module"]] = float(tensors.get(name).float().item())
        else:
            plain[stripped] = name

    unknown = sorted([m for m in factors if f"{m}.weight" not in params] + [k for k in plain if k not in params])
    if unknown:
        raise CheckpointError(
            f"{label}: {len(unknown)} LoRA target(s) do not exist in the diffusion model, e.g. {unknown[:5]}. "
            "This LoRA was made for another model; use LiveAvatar's liveavatar.safetensors."
        )
    if not factors and not plain:
        raise CheckpointError(f"{label}: holds no LoRA factors or weights. Use LiveAvatar's liveavatar.safetensors.")

    for module, sides in factors.items():
        if set(sides) != {"A", "B"}:
            raise CheckpointError(
                f"{label}: {module} has lora_{''.join(sides)} without its partner. The file is incomplete."
            )
        weight = params[f"{module}.weight"]
        down, up = tensors.get(sides["A"]).float(), tensors.get(sides["B"]).float()
        if up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1] or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"{label}: LoRA for {module} has shapes {tuple(down.shape)} / {tuple(up.shape)}, which do not fit "
                f"the weight {tuple(weight.shape)}. This LoRA was made for another model size."
            )
        rank = down.shape[0]
        scale = alphas[module] / rank if module in alphas else DEFAULT_SCALE
        delta = (up.to(weight.device) @ down.to(weight.device)) * (scale * strength)
        weight.copy_((weight.float() + delta).to(weight.dtype))

    for stripped, name in plain.items():
        target = params[stripped]
        value = tensors.get(name)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{label}: {stripped} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}."
            )
        target.copy_(value.to(device=target.device, dtype=target.dtype))
    return LoraReport(merged=len(factors), replaced=len(plain))
