"""The networks a rank needs, loaded by the rank itself from the same files.

A `ModelSource` is anything picklable with `load_dit(device)` and `load_vae(device)` (such as
`FileModels`): worker processes receive it and build their own copies (no weights cross
process boundaries).
`RankModels` loads each network the first time the rank's stage needs it and keeps it for
later runs, so a rank that never decodes never holds the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..dit import WanS2VTransformer
from ..model_files import ModelFiles, Precision
from ..vae import WanVAE, load_vae


class ModelSource(Protocol):
    def load_dit(self, device: torch.device) -> WanS2VTransformer: ...

    def load_vae(self, device: torch.device) -> WanVAE: ...


@dataclass(frozen=True)
class FileModels:
    """A `ModelSource` that loads the DiT (+ LoRA) and the VAE of `files` in `precision`
    (`compile_elementwise`: see `load_models`)."""

    files: ModelFiles
    precision: Precision = Precision()
    compile_elementwise: bool | None = None

    def stamp(self) -> str:
        """A warm pool whose files changed on disk is replaced rather than reused."""
        return self.files.stamp()

    def load_dit(self, device: torch.device) -> WanS2VTransformer:
        # Imported here: `..models` brings in the text and audio encoders, which ranks never run.
        from ..models import load_dit_as

        return load_dit_as(self.files, device, self.precision, self.compile_elementwise)

    def load_vae(self, device: torch.device) -> WanVAE:
        return load_vae(self.files.vae, device=device, dtype=self.precision.small(device))


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
