"""The networks a rank needs, loaded by the rank itself from the same files.

A `ModelSource` is anything picklable with `load_dit(device)` and `load_vae(device)`: worker
processes receive it and build their own copies (no weights cross process boundaries).
`RankModels` loads each network the first time the rank's stage needs it and keeps it for
later runs, so a rank that never decodes never holds the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..dit import WanS2VTransformer
from ..dit.fp8 import FP8
from ..vae import WanVAE, load_vae


class ModelSource(Protocol):
    def load_dit(self, device: torch.device) -> WanS2VTransformer: ...

    def load_vae(self, device: torch.device) -> WanVAE: ...


@dataclass(frozen=True)
class ModelFiles:
    """The DiT (official shards, one of them, or ComfyUI's file), LiveAvatar's LoRA and the VAE."""

    dit: Path
    vae: Path
    lora: Path | None = None
    lora_strength: float = 1.0  # LiveAvatar's LoRA is a distillation at full strength
    dtype: torch.dtype = torch.bfloat16  # float8_e4m3fn: the DiT's linear layers in fp8, the rest bf16

    def stamp(self) -> str:
        """Sizes and modification times of the files: a warm pool whose files changed on disk
        is replaced rather than reused (see `shared_pools`)."""
        from ..file_stamps import file_stamp
        from ..models import whole_checkpoint

        return "|".join(file_stamp(p) for p in (whole_checkpoint(self.dit), self.vae, self.lora))

    @property
    def fp8(self) -> bool:
        return self.dtype == FP8

    @property
    def full_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.fp8 else self.dtype

    def load_dit(self, device: torch.device) -> WanS2VTransformer:
        # Imported here: `..models` brings in the text and audio encoders, which ranks never run.
        from ..models import load_dit_as

        return load_dit_as(self, device, self.full_dtype, self.fp8)

    def load_vae(self, device: torch.device) -> WanVAE:
        # Half-precision convolutions are slow on the CPU (as in `models.load_models`).
        return load_vae(self.vae, device=device, dtype=self.full_dtype if device.type == "cuda" else torch.float32)


class RankModels:
    def __init__(self, source: ModelSource, device: torch.device):
        self.source = source
        self.device = device
        self._dit: WanS2VTransformer | None = None
        self._vae: WanVAE | None = None

    def dit(self) -> WanS2VTransformer:
        if self._dit is None:
            self._dit = self.source.load_dit(self.device)
        return self._dit

    def vae(self) -> WanVAE:
        if self._vae is None:
            self._vae = self.source.load_vae(self.device)
        return self._vae
