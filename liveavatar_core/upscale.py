"""Upscaling each block of the stream with an image model (ESRGAN, 4x-UltraSharp, ...).

The model is any callable on [B, 3, H, W] 0..1 images that returns them `scale` times larger;
how it is run over tiles comes from the caller (ComfyUI's `tiled_scale` in the node), so this
module knows no model format. As ComfyUI's own Upscale Image (using Model) does, tiles start at
512 pixels with a 32-pixel overlap and are halved when the device runs out of memory, down to
128. An optional rescale factor resizes the result, e.g. 0.5 turns a 4x model into 2x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import InputError
from .stream_transforms import FrameTransform, even_size

FIRST_TILE = 512
MIN_TILE = 128
TILE_OVERLAP = 32

# (images [B, 3, H, W] on the device, tile, overlap) -> [B, 3, H*scale, W*scale]
TiledRunner = Callable[[torch.Tensor, int, int], torch.Tensor]


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
    return tuple(errors) or (RuntimeError,)


class ModelUpscale(FrameTransform):
    """Upscales every block by `scale` * `rescale` (sides rounded to even).

    run_tiled:   runs the model over tiles (see `TiledRunner`).
    scale:       the model's own factor (1, 2, 4, ...).
    rescale:     resize after the model; 1.0 keeps the model's size.
    device:      where the frames go for the model.
    on_device:   optional context manager factory that holds the model on `device` for the run.
    oom_errors:  what the device raises when it runs out of memory (the tile is then halved).
    """

    name = "Stream Upscale"

    def __init__(
        self,
        run_tiled: TiledRunner,
        scale: float,
        rescale: float = 1.0,
        device="cpu",
        on_device: Callable[[], contextlib.AbstractContextManager] | None = None,
        oom_errors: tuple[type[BaseException], ...] | None = None,
    ):
        if scale <= 0:
            raise InputError(f"the upscale model's scale is {scale}; load an upscale model (Load Upscale Model).")
        if not 0.05 <= rescale <= 8:
            raise InputError(f"rescale_factor={rescale} is outside 0.05..8; 1.0 keeps the model's own size.")
        self._run_tiled = run_tiled
        self.scale, self.rescale = scale, rescale
        self.device = torch.device(device)
        self._on_device = on_device
        self._oom_errors = oom_errors or _out_of_memory_errors()
        self.tile = FIRST_TILE

    def settings(self) -> dict:
        return {"scale": self.scale, "rescale": self.rescale}

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        factor = self.scale * self.rescale
        return even_size(width * factor, height * factor)

    def active(self):
        return self._on_device() if self._on_device is not None else contextlib.nullcontext()

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        height, width = frames.shape[1:3]
        images = frames.movedim(-1, -3).to(self.device)
        upscaled = self._upscale(images)
        target_w, target_h = self.output_size(width, height)
        if tuple(upscaled.shape[-2:]) != (target_h, target_w):
            # antialias when shrinking, so a 4x model rescaled to 2x does not alias
            upscaled = F.interpolate(
                upscaled.float(), size=(target_h, target_w), mode="bicubic", align_corners=False, antialias=True
            )
        return upscaled.clamp(0, 1).movedim(-3, -1).float().cpu()

    def _upscale(self, images: torch.Tensor) -> torch.Tensor:
        # The tile that fitted stays for the blocks after it: memory does not change mid-run.
        while True:
            try:
                return self._run_tiled(images, self.tile, TILE_OVERLAP)
            except self._oom_errors:
                if self.tile // 2 < MIN_TILE:
                    raise
                self.tile //= 2
