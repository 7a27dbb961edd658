"""Which files the networks come from, and in which precision they run.

`ModelFiles` names the files (any subset: worker processes need only the DiT, the LoRA and
the VAE). `Precision` is the one dtype policy of every host: the DiT's weights as asked
(fp8 = its linear layers in float8_e4m3fn, the rest in bfloat16), umT5 in the same dense
dtype, and the VAE and wav2vec2 in it on GPUs but in float32 on the CPU, where
half-precision convolutions are slow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .dit.fp8 import FP8
from .errors import InputError
from .file_stamps import file_stamp

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_e4m3fn": FP8}
# LiveAvatar's LoRA is trained as a distillation of the base model at this strength.
DEFAULT_LORA_STRENGTH = 1.0
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


@dataclass(frozen=True)
class Precision:
    """weights: the DiT's weight dtype as asked (`WEIGHT_DTYPES`' values)."""

    weights: torch.dtype = torch.bfloat16

    @classmethod
    def of(cls, value: Precision | torch.dtype | str) -> Precision:
        """From itself, a dtype, or a `WEIGHT_DTYPES` name (InputError for others)."""
        if isinstance(value, Precision):
            return value
        if isinstance(value, torch.dtype):
            return cls(value)
        if value not in WEIGHT_DTYPES:
            raise InputError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {value!r}.")
        return cls(WEIGHT_DTYPES[value])

    @property
    def fp8(self) -> bool:
        return self.weights == FP8

    @property
    def dense(self) -> torch.dtype:
        """The dtype of every weight that is not an fp8 linear layer (the DiT's rest, umT5)."""
        return torch.bfloat16 if self.fp8 else self.weights

    def small(self, device: torch.device | str) -> torch.dtype:
        """The VAE's and wav2vec2's dtype on `device`."""
        return self.dense if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True, kw_only=True)
class ModelFiles:
    """The DiT (official shards, one of them, or ComfyUI's file), the VAE, the encoders and
    LiveAvatar's LoRA."""

    dit: Path
    vae: Path | None  # None: the VAE is given ready-made to `load_models`
    text_encoder: Path | None = None
    audio_encoder: Path | None = None
    lora: Path | None = None
    lora_strength: float = DEFAULT_LORA_STRENGTH

    def stamp(self) -> str:
        """Sizes and modification times of the files: a warm worker pool whose files changed
        on disk is replaced rather than reused (see `parallel.shared_pools`)."""
        paths = (whole_checkpoint(self.dit), self.vae, self.lora, self.text_encoder, self.audio_encoder)
        return "|".join(file_stamp(p) for p in paths)


def whole_checkpoint(path: str | Path) -> Path:
    """A shard of a sharded release (`...-00001-of-00004.safetensors`) stands for its whole
    folder, so picking any shard in a file list loads the complete model."""
    path = Path(path)
    if _SHARD.search(path.name) and len(list(path.parent.glob("*.safetensors.index.json"))) == 1:
        return path.parent
    return path
