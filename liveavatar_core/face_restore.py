"""Restoring the face region of each block with a face model (GFPGAN, CodeFormer, ...), pasted back.

A talking-avatar video keeps the speaker's face in one place (the head moves a little within
the frame), so the region is a fixed square given as fractions of the frame, set once for the
video; no face detector is needed. Each block's square is resized to the model's input size,
restored, resized back and blended in with a feathered edge, so no seam shows.

The model is any callable on [B, 3, S, S] 0..1 images that returns images of any size (they are
resized back), so face models and plain restoration models both work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .stream_transforms import FrameTransform


@dataclass(frozen=True)
class FaceRegion:
    """A square around the face: its centre as fractions of the frame's width and height, its
    side as a fraction of the frame's shorter side."""

    center_x: float = 0.5
    center_y: float = 0.4
    size: float = 0.6

    def validate(self) -> None:
        for name in ("center_x", "center_y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"face {name}={getattr(self, name)} is outside 0..1 (fractions of the frame).")
        if not 0.05 <= self.size <= 1.0:
            raise InputError(f"face size={self.size} is outside 0.05..1 (a fraction of the frame's shorter side).")

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, side, side) in pixels, moved inside the frame."""
        side = max(8, round(self.size * min(width, height)))
        left = min(max(0, round(self.center_x * width - side / 2)), width - side)
        top = min(max(0, round(self.center_y * height - side / 2)), height - side)
        return left, top, side, side


def feathered_mask(side: int, feather: float) -> torch.Tensor:
    """[side, side] weights: 1 inside, falling linearly to 0 over `feather` of the side at the edges."""
    ramp = round(side * feather)
    if ramp == 0:
        return torch.ones(side, side)
    distance = torch.minimum(torch.arange(side), torch.arange(side).flip(0)).float()
    edge = ((distance + 0.5) / ramp).clamp(max=1.0)
    return edge[:, None] * edge[None, :]


class FaceRestore(FrameTransform):
    """Restores `region` of every frame with `restore` and blends it back by `strength`.

    restore:     [B, 3, S, S] 0..1 on `device` -> restored images (any size).
    input_size:  S, the side the model wants (512 for GFPGAN and CodeFormer); None = the square's own.
    strength:    1.0 = the restored face, 0.5 = half original; 0 leaves the frames untouched.
    feather:     the blended edge, as a fraction of the square's side.
    """

    name = "Stream Face Restore"

    def __init__(
        self,
        restore: Callable[[torch.Tensor], torch.Tensor],
        region: FaceRegion = FaceRegion(),
        input_size: int | None = 512,
        strength: float = 1.0,
        feather: float = 0.1,
        device="cpu",
        on_device: Callable[[], contextlib.AbstractContextManager] | None = None,
        batch: int = 4,
    ):
        region.validate()
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"strength={strength} is outside 0..1 (1 = fully restored, 0 = untouched).")
        if not 0.0 <= feather <= 0.5:
            raise InputError(f"feather={feather} is outside 0..0.5 (a fraction of the face square's side).")
        if input_size is not None and input_size < 8:
            raise InputError(f"the face model's input size {input_size} is too small.")
        self._restore = restore
        self.region, self.input_size, self.strength, self.feather = region, input_size, strength, feather
        self.device = torch.device(device)
        self._on_device = on_device
        self._batch = batch

    def settings(self) -> dict:
        return {
            "region": self.region,
            "input_size": self.input_size,
            "strength": self.strength,
            "feather": self.feather,
        }

    def active(self):
        return self._on_device() if self._on_device is not None else contextlib.nullcontext()

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return frames
        height, width = frames.shape[1:3]
        left, top, side, _ = self.region.box(width, height)
        weight = (feathered_mask(side, self.feather) * self.strength)[None, :, :, None]
        out = frames.clone()
        for start in range(0, frames.shape[0], self._batch):
            crop = frames[start : start + self._batch, top : top + side, left : left + side]
            restored = self._restored(crop.movedim(-1, -3).to(self.device), side).movedim(-3, -1).cpu()
            out[start : start + self._batch, top : top + side, left : left + side] = crop + weight * (restored - crop)
        return out

    def _restored(self, faces: torch.Tensor, side: int) -> torch.Tensor:
        model_in = faces.float()
        if self.input_size is not None and self.input_size != side:
            model_in = F.interpolate(
                model_in, size=(self.input_size,) * 2, mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        restored = self._restore(model_in).float()
        return F.interpolate(restored, size=(side, side), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
