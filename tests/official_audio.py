"""The official audio bucketing of Wan2.2-S2V / LiveAvatar (`get_audio_embed_bucket_fps`), as
the reference the audio encoder's per-frame features are compared with. Only the tests use it:
the pipeline computes any frame range directly (`audio_encoder.features_for_frames`)."""

from __future__ import annotations

import numpy as np
import torch

from liveavatar_core.audio_encoder import FPS, VIDEO_RATE, WINDOW_NEIGHBOURS, _windows_at, audio_steps_for_frames


def official_clip_count(audio_steps: int, fps: int = FPS, infer_frames: int = 48, video_rate: int = VIDEO_RATE) -> int:
    """Clips of `infer_frames` the official code renders for `audio_steps` feature steps.

    Always one more than the whole clips the audio fills, so a track ending exactly on a clip
    border gets a final clip of pure silence.
    """
    return int(audio_steps / (infer_frames * (video_rate / fps))) + 1


def bucket_per_frame(
    features: torch.Tensor,
    fps: int = FPS,
    batch_frames: int = 48,
    m: int = WINDOW_NEIGHBOURS,
    video_rate: int = VIDEO_RATE,
) -> tuple[torch.Tensor, int]:
    """The official `get_audio_embed_bucket_fps`: whole clips of per-frame feature windows.

    Args:
        features: `[L, T30, C]`.
        batch_frames: video frames per clip (`infer_frames`, 48 for LiveAvatar).

    Returns:
        `([clips * batch_frames, L, (2m+1)*C], clips)` with `clips = official_clip_count(T30)`.
    """
    clips = official_clip_count(features.shape[1], fps, batch_frames, video_rate)
    total = clips * batch_frames
    # The official index table is clipped to its padded length; that never binds below 60 fps.
    padded_steps = int(np.ceil(total / fps * video_rate))
    steps = np.minimum(audio_steps_for_frames(range(total), fps, video_rate), padded_steps - 1)
    return _windows_at(features, steps, fps, m, video_rate), clips


def to_dit_layout(buckets: torch.Tensor) -> torch.Tensor:
    """`[frames, L, W]` -> the DiT's `[1, L, W, frames]` (the official unsqueeze + permute)."""
    return buckets.unsqueeze(0).permute(0, 2, 3, 1)
