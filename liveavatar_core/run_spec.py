"""One video run, described once: `RunSpec` (made and checked by `RunSpec.make`) and its
`Schedule` of block work items.

Every host consumes the same spec: the in-process `StreamingPipeline.stream`, the worker pool
and its stages (`parallel.run_stage`) and the torchrun command. Nothing downstream checks an
input again: a spec that exists is valid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import InputError
from .semantics import VideoSemantics
from .sizing import checked_portrait, fit_reference, output_size
from .streaming.sampler import SamplerSettings, check_kv_cache
from .time_grid import TEMPORAL_STRIDE, VIDEO_START_OFFSET, clips_for_frames, frames_for_run


@dataclass(frozen=True)
class WorkItem:
    """One block of one clip: latent frames `start`..`start + frames` of clip `clip`."""

    clip: int
    block: int
    start: int
    frames: int


@dataclass(frozen=True)
class Schedule:
    """The blocks a run computes, in order, and the one after which the sink rolls (clip 0's
    last block, in runs whose semantics roll it; None otherwise)."""

    items: tuple[WorkItem, ...]
    roll_after: WorkItem | None
    blocks_per_clip: int

    @property
    def clips(self) -> int:
        return self.items[-1].clip + 1

    def blocks(self) -> list[tuple[int, int]]:
        """(clip, block) of every item."""
        return [(item.clip, item.block) for item in self.items]


@dataclass(frozen=True, eq=False)
class RunSpec:
    """Everything one video run needs, checked: the fitted portrait, the conditioning, the
    sampler settings, the output size, clip and frame counts, and where the run happens."""

    reference: torch.Tensor  # the portrait fitted to the output size, [1, 3, 1, height, width] in -1..1
    audio_features: torch.Tensor  # [1, layers, dim, frames]: one wav2vec2 window per video frame
    context: torch.Tensor  # prompt embeddings [tokens, dim]
    negative_context: torch.Tensor | None  # the negative prompt's, used with guidance only
    settings: SamplerSettings
    width: int
    height: int
    clips: int  # clips the run may compute
    frames: int  # frames the finished video holds
    trim_to_audio: bool
    semantics: VideoSemantics
    kv_cache: str  # where the attention caches live: "device" or "host" memory
    gpus: int  # 1: one process; more: that many pipeline processes

    @classmethod
    def make(
        cls,
        image: torch.Tensor,
        audio_features: torch.Tensor,
        context: torch.Tensor,
        size: str | tuple[int, int],
        settings: SamplerSettings,
        num_clip: int | None = None,
        negative_context: torch.Tensor | None = None,
        trim_to_audio: bool = True,
        semantics: VideoSemantics | str | None = None,
        kv_cache: str = "device",
        gpus: int = 1,
        size_mode: str = "exact",
    ) -> RunSpec:
        """Checks every input (InputError naming it and the fix), before any compute.

        image: the portrait [H, W, 3] in 0..1 (the first of a batch); num_clip: None = as many
        clips as the audio needs (clips past its end get silence); size_mode: 'exact' (scale
        and centre-crop the portrait to `size`) or 'official_area' (`size` is an area budget,
        the portrait's aspect ratio sets the shape, as in the official CLI); with
        `trim_to_audio` the video stops where the audio does; semantics: which official
        pipeline's conditioning and decoding the run reproduces (`VideoSemantics` or its name;
        default `official-multi-gpu`)."""
        settings.validate()
        semantics = VideoSemantics.of(semantics)
        check_kv_cache(kv_cache)
        if gpus < 1:
            raise InputError(f"gpus must be at least 1 (1 = this process), got {gpus}.")
        image = checked_portrait(image)
        width, height = output_size(size, size_mode, image)
        if num_clip is not None and num_clip < 1:
            raise InputError(f"num_clip must be at least 1 (or 'auto' to follow the audio), got {num_clip}.")
        if settings.guide_scale > 0 and negative_context is None:
            raise InputError(
                "sample_guide_scale > 0 needs a negative prompt: encode it with EncodePrompt, or set the scale to 0."
            )
        if audio_features.dim() != 4 or audio_features.shape[-1] == 0:
            raise InputError("the audio is empty: give a speech track of at least one video frame (40 ms).")
        audio_frames = audio_features.shape[-1]
        clips = num_clip or clips_for_frames(audio_frames, settings.infer_frames)
        frames = frames_for_run(audio_frames, clips, settings.infer_frames, trim_to_audio)
        return cls(
            fit_reference(image, width, height),
            audio_features,
            context,
            negative_context,
            settings,
            width,
            height,
            clips,
            frames,
            trim_to_audio,
            semantics,
            kv_cache,
            gpus,
        )

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The run's blocks: every process stops at the block whose decoded frames reach the
        run's length, counted up front from the decode's rule (four frames per latent frame,
        less the `VIDEO_START_OFFSET` frames clip 0 drops), so ranks that never see frames
        agree with the one that decodes."""
        blocks = self.settings.blocks()
        items, frames = [], -VIDEO_START_OFFSET
        for clip in range(self.clips):
            for block, (start, latent_frames) in enumerate(blocks):
                items.append(WorkItem(clip, block, start, latent_frames))
                frames += TEMPORAL_STRIDE * latent_frames
                if frames >= self.frames:
                    break
            else:
                continue
            break
        clips = items[-1].clip + 1
        roll_after = items[len(blocks) - 1] if self.semantics.rolls_sink(clips) else None
        return Schedule(tuple(items), roll_after, len(blocks))

    @property
    def total_steps(self) -> int:
        """DiT steps of the whole run (for progress bars)."""
        return len(self.schedule.items) * self.settings.sample_steps
