"""What the DiT is conditioned on, made from the user's inputs: one module below every host
(the nodes, the job API, the torchrun command).

The "audio" of a run goes by four names, one per stage:
- waveform: the speech as given ([channels, samples] at its own rate; `EncodedAudio.track`
  keeps it, peak-limited, for the mp4);
- features: wav2vec2's hidden states, one window per video frame at 25 fps,
  [1, layers, dim, frames] (`EncodedAudio.features`, `RunSpec.audio_features`);
- clip / block features: the windows of one clip or one block (`time_grid.clip_features`);
- audio tokens: what the DiT's audio encoder makes of block features (inside `dit/`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .audio_io import is_silent, limit_peak, to_16k_mono
from .errors import InputError
from .time_grid import FPS, clips_for_frames, frames_for_run, samples_for_frames, start_offset_samples

# Wan2.2's default negative prompt (its `sample_neg_prompt`), used when guidance is on and
# the user leaves the negative prompt empty.
WAN_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FEATURE_DTYPE = torch.bfloat16  # the DiT's own input precision; features wait on the CPU in it

Placement = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class EncodedAudio:
    """features: [1, layers, dim, frames] (one window per video frame at 25 fps);
    track: the speech waveform as given, [channels <= 2, samples] at `sample_rate`, for the mp4."""

    features: torch.Tensor
    track: torch.Tensor
    sample_rate: int

    @property
    def frames(self) -> int:
        return self.features.shape[-1]

    def clips_needed(self, infer_frames: int) -> int:
        return clips_for_frames(self.frames, infer_frames)

    def video_frames(self, num_clip: int, infer_frames: int, trim_to_audio: bool = True) -> int:
        """Frames a video of `num_clip` clips holds (cut where the audio ends when trimming)."""
        return frames_for_run(self.frames, num_clip, infer_frames, trim_to_audio)

    def track_for_frames(self, frames: int) -> torch.Tensor:
        """The track [channels, samples] under `frames` video frames: shifted to the video's
        first frame, padded with silence where the video runs past the audio."""
        skip = start_offset_samples(self.sample_rate)
        length = samples_for_frames(frames, self.sample_rate)
        track = self.track[:, skip : skip + length]
        if track.shape[-1] < length:
            track = torch.cat([track, track.new_zeros(track.shape[0], length - track.shape[-1])], dim=-1)
        return track


@dataclass(frozen=True)
class PromptEmbeddings:
    positive: torch.Tensor
    negative: torch.Tensor | None = None


def encode_audio(
    encoder, waveform: torch.Tensor, sample_rate: int, name: str = "audio", placed: Placement = contextlib.nullcontext
) -> EncodedAudio:
    """Any sample rate, mono or stereo, [samples], [channels, samples] or [batch, channels,
    samples]. A silent track is refused before the encoder runs. `placed()` is held while the
    encoder (an `AudioEncoder`) runs, e.g. to move it onto the compute device."""
    wave16k = to_16k_mono(waveform, sample_rate, name=name)
    if is_silent(wave16k):
        raise InputError(
            f"{name} is silent (its peak is below -80 dBFS), so there is no speech to drive the face. "
            "Check the file or its volume; for a still speaker, use a recording of room noise."
        )
    with placed():
        features = encoder.features_for_video(wave16k, FPS)
    return EncodedAudio(features.to("cpu", FEATURE_DTYPE), _playable_track(waveform), int(sample_rate))


def _playable_track(waveform: torch.Tensor) -> torch.Tensor:
    """[channels, samples] float32 with 1 or 2 channels (more are mixed down to mono)."""
    track = torch.as_tensor(waveform).detach().float().cpu()
    if track.dim() == 3:
        track = track[0]
    if track.dim() == 1:
        track = track[None]
    return limit_peak(track if track.shape[0] <= 2 else track.mean(dim=0, keepdim=True))


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise InputError("the prompt is empty: describe the speaker and the scene (one or two sentences).")


def encode_prompt(
    encoder, prompt: str, negative_prompt: str | None = None, placed: Placement = contextlib.nullcontext
) -> PromptEmbeddings:
    """umT5 embeddings (a `TextEncoder`) of the prompt and of the negative prompt (Wan's
    default when empty)."""
    check_prompt(prompt)
    negative = negative_prompt if negative_prompt and negative_prompt.strip() else WAN_NEGATIVE_PROMPT
    with placed():
        positive_emb, negative_emb = encoder.encode([prompt, negative])
    return PromptEmbeddings(positive_emb.cpu(), negative_emb.cpu())
