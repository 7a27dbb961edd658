"""The run's time grid: how video frames, latent frames, blocks, clips and audio line up.

- Video runs at `FPS`; the wav2vec2 features hold one window per video frame.
- The VAE packs `TEMPORAL_STRIDE` video frames into one latent frame; a clip of
  `infer_frames` video frames is `infer_frames // 4` latent frames, denoised in blocks of
  `BLOCK_FRAMES` latent frames (the last block of a clip shorter when 3 does not divide).
- Neither official pipeline keeps the first `VIDEO_START_OFFSET` frames of clip 0: the video
  starts there, and so does the audio under it (the official code muxes from t=0, 120 ms early).
- The motion context is `MOTION_FRAMES` pixel frames (the DiT config's default).
"""

from __future__ import annotations

import math

import torch

from .dit.config import MOTION_FRAMES

__all__ = [
    "BLOCK_FRAMES",
    "FPS",
    "MOTION_FRAMES",
    "TEMPORAL_STRIDE",
    "VIDEO_START_OFFSET",
    "clip_features",
    "clips_for_frames",
    "frames_for_run",
    "samples_for_frames",
    "start_offset_samples",
    "video_frames",
]

FPS = 25
TEMPORAL_STRIDE = 4  # video frames per latent frame (the Wan VAE's)
BLOCK_FRAMES = 3  # latent frames per causal block
VIDEO_START_OFFSET = 3  # frames of clip 0's first block neither official pipeline keeps


def clips_for_frames(audio_frames: int, infer_frames: int) -> int:
    """How many clips cover `audio_frames` video frames of audio."""
    return max(1, math.ceil(audio_frames / infer_frames))


def video_frames(clips: int, infer_frames: int) -> int:
    """Frames `clips` whole clips yield."""
    return clips * infer_frames - VIDEO_START_OFFSET


def frames_for_run(audio_frames: int, clips: int, infer_frames: int, trim_to_audio: bool = True) -> int:
    """Frames a run of `clips` clips yields; when trimming, no more than the audio covers."""
    frames = video_frames(clips, infer_frames)
    return min(frames, max(1, audio_frames - VIDEO_START_OFFSET)) if trim_to_audio else frames


def samples_for_frames(frames: int, sample_rate: int) -> int:
    """Audio samples under `frames` video frames."""
    return round(frames * sample_rate / FPS)


def start_offset_samples(sample_rate: int) -> int:
    """Audio samples before the video's first frame (the `VIDEO_START_OFFSET` frames)."""
    return samples_for_frames(VIDEO_START_OFFSET, sample_rate)


def clip_features(features: torch.Tensor, clip: int, infer_frames: int) -> torch.Tensor:
    """Clip `clip`'s audio feature windows [..., infer_frames], padded with silence (zeros)
    past the end of the audio."""
    part = features[..., clip * infer_frames : (clip + 1) * infer_frames]
    if part.shape[-1] < infer_frames:
        part = torch.cat([part, part.new_zeros(*part.shape[:-1], infer_frames - part.shape[-1])], dim=-1)
    return part
