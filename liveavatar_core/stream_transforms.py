"""Per-block post-processing inside the video stream (upscaling, face restoration, ...).

A video job yields its frames block by block; `TransformedJob` wraps a job so every block is
transformed as soon as it is decoded, before it is written. Only one block (12 frames at 48
infer_frames) is ever held, so memory stays flat however long the video, where chaining the
frames into image nodes afterwards needs every frame in RAM at once.

A transform is model-agnostic: it gets frames [N, H, W, 3] float 0..1 on the CPU and returns
frames of the size `output_size` promised (sides even, as H.264 in yuv420p needs). Wrapped jobs
wrap again, so transforms chain in the order the nodes are connected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from .errors import InputError
from .semantics import FrameChunk


class FrameTransform:
    """Base of the per-block transforms: the size they produce and the work per block."""

    name = "transform"
    # Which model weights the transform runs (e.g. their digest), set by whoever loads them:
    # a resumed run checks that the frames it appends come from the same ones.
    model_identity = "unknown"

    def settings(self) -> dict:
        """What decides its frames besides the model (for `describe`)."""
        return {}

    def describe(self) -> str:
        """The transform, its settings and its model, in one line."""
        settings = ", ".join(f"{key}={value}" for key, value in sorted(self.settings().items()))
        return f"{self.name}({settings}; model {self.model_identity})"

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def active(self) -> contextlib.AbstractContextManager:
        """Held while the run streams: e.g. the model on the GPU, moved back afterwards."""
        return contextlib.nullcontext()


class TransformedJob:
    """A video job whose blocks pass through `transform`; everything else is the wrapped job's.

    It quacks like the job it wraps (`render` and the nodes use it unchanged): `width` and
    `height` are the transformed size, `frames` yields transformed chunks."""

    def __init__(self, job, transform: FrameTransform):
        width, height = transform.output_size(job.width, job.height)
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise InputError(
                f"{transform.name} would make {width}*{height} frames from {job.width}*{job.height}; the mp4 "
                "needs positive, even sides. Change the rescale factor."
            )
        self._job = job
        self.transform = transform
        self.width, self.height = width, height

    def __getattr__(self, name):  # only called for what this class does not define
        return getattr(self._job, name)

    @property
    def source(self):
        """The job this one wraps."""
        return self._job

    def frames(
        self, progress: Callable | None = None, should_stop: Callable[[], bool] | None = None, **options
    ) -> Iterator[FrameChunk]:
        with self.transform.active():
            for chunk in self._job.frames(progress, should_stop, **options):
                frames = self.transform.apply(chunk.frames)
                expected = (chunk.frames.shape[0], self.height, self.width, 3)
                if tuple(frames.shape) != expected:
                    raise RuntimeError(
                        f"{self.transform.name} returned frames of shape {tuple(frames.shape)}, expected {expected}."
                    )
                yield replace(chunk, frames=frames)


def even_size(width: float, height: float) -> tuple[int, int]:
    """The nearest even sides (at least 2): the sizes H.264 in yuv420p can hold."""
    return max(2, 2 * round(width / 2)), max(2, 2 * round(height / 2))
