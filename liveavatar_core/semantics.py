"""The VAE side of a streaming run, exactly as one of the official LiveAvatar pipelines does it.

The DiT streaming (blocks, per-step caches, sink, RoPE) is the same in both official
pipelines. What the VAE feeds the sink and how the latents become frames is not, and
LiveAvatar was trained and evaluated with that code, so a run follows one of the two by name:

- `official-multi-gpu` (the default, the presets' and the paper's real-time path: LiveAvatar's
  `causal_s2v_pipeline_tpp.py`): the reference is the portrait encoded alone (one latent);
  the motion context is 73 copies of it encoded into 19 latents, never re-encoded. After clip
  0 the sink is refilled with clip 0's first latent (motion unchanged). One streaming decoder
  runs for the whole video; it first consumes the oldest 7 motion latents (their 25 frames are
  thrown away), then each block gives 4 frames per latent, clip 0's first block minus 3.
  Cheap: one small encode per run, one decode per block.
- `official-single-gpu` (`causal_s2v_pipeline.py`): the reference is `encode(portrait x 5)`
  without its first latent; the motion context is a window of 365 frames of pixel history
  (copies of the portrait, then the newest decoded frames: each clip replaces the oldest
  min(73, its frames) frames with its newest) encoded into 92 latents, of which the DiT's
  frame packer reads the newest 19. Each clip is decoded behind its motion prefix, as the
  official `decode(cat[motion, clip])`: a fresh streaming decoder consumes the 92 motion
  latents, then the clip's blocks; then the window is re-encoded for the next clip.
  `sink_roll` is the official `--enable_online_decode`: on, the sink is refilled at clip 1
  with clip 0's first latent and the re-encoded motion; off (the shipped single-GPU script's
  default), the first sink stays. Costly: every clip re-decodes 92 latents and re-encodes 365
  frames.

Frame counts are the same in both: clip 0 gives `infer_frames - 3`, later clips `infer_frames`.
Where we deliberately differ from both (short last blocks, audio offset, seeded sink distance,
guidance and other step counts) see README "Fidelity to the official code".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .finite import check_latents_finite
from .time_grid import MOTION_FRAMES, VIDEO_START_OFFSET
from .vae import WanVAE

MULTI_GPU = "official-multi-gpu"
SINGLE_GPU = "official-single-gpu"
SEMANTICS = (MULTI_GPU, SINGLE_GPU)

PRIMING_LATENTS = 7  # multi-GPU: motion latents the streaming decoder consumes first
REFERENCE_COPIES = 5  # single-GPU: the portrait is repeated 5 times before encoding


@dataclass(frozen=True)
class FrameChunk:
    """Decoded frames [N, H, W, 3] float32 in 0..1 (ComfyUI's IMAGE layout) of one block."""

    clip: int
    block: int
    frames: torch.Tensor
    ends_clip: bool


@dataclass(frozen=True)
class VideoSemantics:
    """Which official pipeline a run reproduces (see the module docstring).

    sink_roll: for `official-single-gpu` only, the official `--enable_online_decode` (refill
    the sink at clip 1); `official-multi-gpu` always refills it, as its official code does."""

    name: str = MULTI_GPU
    sink_roll: bool = True

    @classmethod
    def of(cls, value: VideoSemantics | str | None) -> VideoSemantics:
        """A `VideoSemantics` from itself, a name, or None (the default), checked."""
        semantics = value if isinstance(value, VideoSemantics) else cls() if value is None else cls(value)
        semantics.validate()
        return semantics

    def validate(self) -> None:
        if self.name not in SEMANTICS:
            raise InputError(f"semantics must be one of {', '.join(SEMANTICS)}, got {self.name!r}.")
        if not isinstance(self.sink_roll, bool):
            raise InputError(f"sink_roll must be true or false, got {self.sink_roll!r}.")

    def rolls_sink(self, clips: int) -> bool:
        """Whether the sink is refilled after clip 0 in a run of `clips` clips."""
        return clips > 1 and (self.name == MULTI_GPU or self.sink_roll)

    def video(self, vae: WanVAE, pixels: torch.Tensor, frames: int, blocks_per_clip: int) -> OfficialVideo:
        """The run's sink inputs and decoder; `pixels`: the fitted portrait [1, 3, 1, H, W]."""
        kind = MultiGpuVideo if self.name == MULTI_GPU else SingleGpuVideo
        return kind(vae, pixels, frames, blocks_per_clip)


class OfficialVideo:
    """Clean block latents in, frames out, plus the sink's inputs: the first ones
    (`sink_inputs`, call once before any block) and, once clip 0 is decoded, the rolled ones
    (`rolled_sink`). Frames are [N, H, W, 3] in 0..1 on the CPU, cut at the run's length."""

    def __init__(self, vae: WanVAE, pixels: torch.Tensor, frames: int, blocks_per_clip: int):
        self.vae = vae
        self.pixels = pixels.to(vae.device, torch.float32)
        self.frames_left = frames
        self.last_block = blocks_per_clip - 1
        self._first_latent: torch.Tensor | None = None
        self._motion: torch.Tensor | None = None
        self._decoder = None

    @property
    def finished(self) -> bool:
        return self.frames_left <= 0

    def sink_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference [1, 16, 1, h, w], motion [1, 16, T, h, w]) latents of the first sink."""
        raise NotImplementedError

    def rolled_sink(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference, motion) of the sink from clip 1 on: clip 0's first latent and the
        motion context as it stands after clip 0."""
        return self._first_latent, self._motion

    def decode(self, clip: int, block: int, latents: torch.Tensor) -> FrameChunk | None:
        """The block's frames (None when the cut leaves none of them)."""
        if clip == 0 and block == 0:
            check_latents_finite(latents, "the first block")  # before a black video is written
            self._first_latent = latents[:, :, :1]
        video = self._decode_block(clip, block, latents.to(self.vae.device))
        if clip == 0 and block == 0:
            video = video[:, :, VIDEO_START_OFFSET:]
        self._after_block(clip, block, video)
        frames = _to_image(video)[: self.frames_left]
        self.frames_left -= frames.shape[0]
        if not frames.shape[0]:
            return None
        return FrameChunk(clip, block, frames, block == self.last_block or self.finished)

    def _decode_block(self, clip: int, block: int, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # A resumed run (see `resume`) rebuilds this object's state after the clips already written.
    resumable = False

    def decoder_prefix(self) -> torch.Tensor:
        """The latents the streaming decoder consumes before the first block's."""
        raise NotImplementedError

    def continue_after(self, first_latent: torch.Tensor, decoded: torch.Tensor, frames_done: int) -> None:
        """State as after `frames_done` frames: clip 0's first latent (for the sink roll) and
        the decoder primed with `decoded`, the latest latents it consumed (their frames are
        not given again). Call after `sink_inputs`."""
        raise NotImplementedError

    def _start_decoder(self, prefix: torch.Tensor) -> None:
        """A fresh streaming decoder that has consumed `prefix` (whose frames neither official
        pipeline keeps), so the latents after it decode as the official code decodes them."""
        if self._decoder is not None:
            self._decoder.close()
        self._decoder = self.vae.streaming_decoder()
        self._decoder.decode_next(prefix)

    def _after_block(self, clip: int, block: int, video: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._first_latent = self._motion = None

    def __enter__(self) -> OfficialVideo:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class MultiGpuVideo(OfficialVideo):
    """`official-multi-gpu`: one streaming decode of the whole video behind 7 motion latents."""

    def sink_inputs(self):
        ref = self.vae.encode(self.pixels)
        self._motion = self.vae.encode(self.pixels.repeat(1, 1, MOTION_FRAMES, 1, 1))
        return ref, self._motion

    resumable = True

    def _decode_block(self, clip, block, latents):
        if self._decoder is None:
            self._start_decoder(self.decoder_prefix())
        return self._decoder.decode_next(latents)

    def decoder_prefix(self):
        return self._motion[:, :, :PRIMING_LATENTS]

    def continue_after(self, first_latent, decoded, frames_done):
        self._first_latent = first_latent.to(self.vae.device)
        self.frames_left -= frames_done
        self._start_decoder(decoded.to(self.vae.device))


class SingleGpuVideo(OfficialVideo):
    """`official-single-gpu`: each clip decoded behind the motion latents of the pixel history
    before it; the history re-encoded after every clip that another follows."""

    def __init__(self, *args):
        super().__init__(*args)
        self._history: torch.Tensor | None = None  # [1, 3, 365, H, W] in -1..1
        self._clip_video: list[torch.Tensor] = []

    def sink_inputs(self):
        copies = self.pixels.repeat(1, 1, REFERENCE_COPIES, 1, 1)
        ref = self.vae.encode(copies)[:, :, 1:]
        self._history = copies.repeat(1, 1, MOTION_FRAMES, 1, 1)
        self._motion = self.vae.encode(self._history)
        return ref, self._motion

    def _decode_block(self, clip, block, latents):
        if block == 0:
            self._start_decoder(self._motion)  # official: decode(cat[motion, clip]), the clip's frames kept
            self._clip_video = []
        return self._decoder.decode_next(latents)

    def _after_block(self, clip, block, video):
        self._clip_video.append(video)
        if block == self.last_block and self.frames_left > video.shape[2]:  # another clip follows
            clip_video = torch.cat(self._clip_video, dim=2)
            self._clip_video = []
            overlap = min(MOTION_FRAMES, clip_video.shape[2])
            self._history = torch.cat([self._history[:, :, overlap:], clip_video[:, :, -overlap:]], dim=2)
            self._motion = self.vae.encode(self._history)

    def close(self):
        self._history = None
        self._clip_video = []
        super().close()


def _to_image(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, N, H, W] in -1..1 -> [N, H, W, 3] float32 in 0..1 on the CPU."""
    return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()
