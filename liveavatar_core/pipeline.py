"""The streaming LiveAvatar pipeline: reference image + audio features + text embeddings in,
decoded frames out, clip by clip, with flat memory.

Flow per run:
1. The reference image is resized/cropped to the output size; the run's semantics (see
   `semantics.py`: `official-multi-gpu` by default, or `official-single-gpu`) encode it into
   the sink's reference and motion latents exactly as that official pipeline does.
2. The sampler prefills its sink and generates clip after clip, block after block.
3. Each finished block is decoded at once by the semantics' streaming decode and handed to
   the caller; nothing per clip is kept afterwards beyond the fixed motion window.
4. After clip 0 the sink rolls (always in `official-multi-gpu`; with `sink_roll` in
   `official-single-gpu`): the first generated latent frame becomes the reference. Later
   clips see earlier ones through the KV caches.

The video starts 3 frames into clip 0 (official: clip 0 yields 45 frames, later clips 48).
The audio that belongs to those 3 frames is skipped (`VIDEO_START_OFFSET`), keeping lips in
sync; the official code muxes the audio from t=0, 120 ms early.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dit import WanS2VTransformer
from .errors import InputError
from .limits import check_size
from .overlapped_decode import DecodeQueue
from .semantics import VIDEO_START_OFFSET, FrameChunk, VideoSemantics
from .streaming import CausalDiT, CausalSampler, GenerationCancelled, Progress, SamplerSettings
from .vae import TEMPORAL_STRIDE, WanVAE

FPS = 25
# Width*height the official CLI accepts; any multiple of 16 works for the networks.
OFFICIAL_SIZES = (
    "720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
    "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256",
)


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """'688*368' or (688, 368) -> (width, height), checked for the networks' 16-pixel grid."""
    if isinstance(size, str):
        try:
            width, height = (int(v) for v in size.lower().replace("x", "*").split("*"))
        except ValueError:
            raise InputError(f"size must look like '688*368' (width*height), got {size!r}.") from None
    else:
        width, height = size
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise InputError(
            f"size {width}*{height} is not a multiple of 16 in both directions; pick one of the "
            f"official sizes ({', '.join(OFFICIAL_SIZES)}) or round to multiples of 16."
        )
    check_size(width, height)
    return width, height


def fit_reference(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, 3] (or [1, H, W, 3]) image in 0..1 -> [1, 3, 1, height, width] in -1..1.

    Scales so the image covers the target size, then crops the centre (no stretching)."""
    if image.dim() == 4:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] not in (3, 4) or image.numel() == 0:
        raise InputError(f"reference image must be [H, W, 3] in 0..1, got shape {tuple(image.shape)}.")
    pixels = image[..., :3].permute(2, 0, 1)[None].float()
    scale = max(width / pixels.shape[-1], height / pixels.shape[-2])
    new_w, new_h = max(width, round(pixels.shape[-1] * scale)), max(height, round(pixels.shape[-2] * scale))
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    pixels = pixels[..., top : top + height, left : left + width].clamp(0, 1)
    return (pixels * 2 - 1).unsqueeze(2)


def clips_for_frames(audio_frames: int, infer_frames: int) -> int:
    """How many clips cover `audio_frames` video frames of audio."""
    return max(1, math.ceil(audio_frames / infer_frames))


def output_frame_count(num_clip: int, infer_frames: int) -> int:
    return num_clip * infer_frames - VIDEO_START_OFFSET


@dataclass(frozen=True)
class RunPlan:
    """What a run will make, decided before any compute: the output size, the clip count and
    the frames to yield."""

    width: int
    height: int
    clips: int
    frames: int


def plan_run(
    audio_features: torch.Tensor,
    size: str | tuple[int, int],
    settings: SamplerSettings,
    num_clip: int | None = None,
    trim_to_audio: bool = True,
) -> RunPlan:
    """Checks a run's inputs and counts its clips and frames (see `StreamingPipeline.stream`)."""
    settings.validate()
    width, height = parse_size(size)
    if audio_features.dim() != 4 or audio_features.shape[-1] == 0:
        raise InputError("the audio is empty: give a speech track of at least one video frame (40 ms).")
    audio_frames = audio_features.shape[-1]
    if num_clip is not None and num_clip < 1:
        raise InputError(f"num_clip must be at least 1 (or 'auto' to follow the audio), got {num_clip}.")
    clips = num_clip or clips_for_frames(audio_frames, settings.infer_frames)
    return RunPlan(width, height, clips, frames_for_run(audio_frames, clips, settings.infer_frames, trim_to_audio))


def planned_blocks(run: RunPlan, settings: SamplerSettings) -> list[tuple[int, int]]:
    """(clip, block) of every block the run computes, in order.

    A single process stops as soon as the decoded frames reach the run's length; ranks that
    never see the frames decide up front, from the decode's counts: four frames per latent
    frame, less the `VIDEO_START_OFFSET` frames clip 0 drops."""
    work, frames = [], -VIDEO_START_OFFSET
    for clip in range(run.clips):
        for block, (_, latent_frames) in enumerate(settings.blocks()):
            work.append((clip, block))
            frames += TEMPORAL_STRIDE * latent_frames
            if frames >= run.frames:
                return work
    return work


def frames_for_run(audio_frames: int, clips: int, infer_frames: int, trim_to_audio: bool = True) -> int:
    """Frames a run of `clips` clips yields; when trimming, no more than the audio covers."""
    frames = output_frame_count(clips, infer_frames)
    return min(frames, max(1, audio_frames - VIDEO_START_OFFSET)) if trim_to_audio else frames


class StreamingPipeline:
    def __init__(
        self,
        dit: WanS2VTransformer,
        vae: WanVAE,
        device: torch.device | str = "cpu",
        overlap_decode: bool | None = None,
        kv_cache: str = "device",
    ):
        """overlap_decode: decode each block while the next is denoised (see `overlapped_decode`);
        None = as the environment's LIVEAVATAR_OVERLAP_DECODE says (off unless "1"): on one
        H200 at 688*368 it ran at 0.97x the in-line speed, the two competing for the same GPU.
        kv_cache: "device", or "host" to keep the attention caches in host memory (low VRAM)."""
        self.dit = dit
        self.vae = vae
        self.device = torch.device(device)
        self.kv_cache = kv_cache
        if overlap_decode is None:
            overlap_decode = os.environ.get("LIVEAVATAR_OVERLAP_DECODE", "0") == "1"
        self.overlap_decode = overlap_decode

    def stream(
        self,
        image: torch.Tensor,
        audio_features: torch.Tensor,
        context: torch.Tensor,
        size: str | tuple[int, int],
        settings: SamplerSettings,
        num_clip: int | None = None,
        negative_context: torch.Tensor | None = None,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        trim_to_audio: bool = True,
        semantics: VideoSemantics | str | None = None,
    ) -> Iterator[FrameChunk]:
        """Yields decoded frames block by block.

        audio_features: [1, 25, audio_dim, frames] (one feature window per video frame at 25
        fps); num_clip: None = as many clips as the audio needs; clips past the end of the
        audio get silence. With `trim_to_audio`, the video stops where the audio stops.
        semantics: which official pipeline's conditioning and decoding to reproduce
        (`VideoSemantics`, or its name; default `official-multi-gpu`).
        Raises GenerationCancelled when `should_stop()` turns true (checked between blocks).
        """
        semantics = VideoSemantics.of(semantics)
        run = plan_run(audio_features, size, settings, num_clip, trim_to_audio)
        sampler = CausalSampler(CausalDiT(self.dit), settings, self.device, self.kv_cache)
        pixels = fit_reference(image, run.width, run.height)
        last_block = planned_blocks(run, settings)[-1]
        rolls = semantics.rolls_sink(last_block[0] + 1)
        with (
            semantics.video(self.vae, pixels, run.frames, len(settings.blocks())) as video,
            DecodeQueue(video.decode, self.device, self.overlap_decode) as decoder,
        ):
            try:
                sampler.start(*video.sink_inputs(), context, negative_context)
                for clip in range(last_block[0] + 1):
                    clip_audio = clip_features(audio_features, clip, settings.infer_frames)
                    for block, (_, latents) in enumerate(sampler.generate_clip(clip, clip_audio, progress, should_stop)):
                        yield from decoder.submit(clip, block, latents)
                        if (clip, block) == last_block:
                            break
                    if clip == 0 and rolls:
                        yield from decoder.drain()  # the sink roll needs clip 0's frames
                        sampler.replace_sink(*video.rolled_sink())
            except GenerationCancelled:
                yield from decoder.drain()  # blocks finished before the stop are kept
                raise
            finally:
                sampler.close()
            yield from decoder.drain()


def clip_features(features: torch.Tensor, clip: int, frames: int) -> torch.Tensor:
    """The clip's feature windows, padded with silence (zeros) past the end of the audio."""
    part = features[..., clip * frames : (clip + 1) * frames]
    if part.shape[-1] < frames:
        part = torch.cat([part, part.new_zeros(*part.shape[:-1], frames - part.shape[-1])], dim=-1)
    return part


def write_video(
    chunks: Iterator[FrameChunk],
    path,
    waveform: torch.Tensor,
    sample_rate: int,
    size: str | tuple[int, int],
    crf: int = 19,
) -> int:
    """Streams `chunks` into an mp4 with the audio muxed; returns the frame count written.

    The audio is shifted by `VIDEO_START_OFFSET` frames so it lines up with the first
    generated frame. Frames are encoded on a thread while the next ones are generated; a run
    stopped or failing at any point leaves a playable file with every clip made before it
    (the exception still propagates).
    """
    from .background_writer import BackgroundWriter
    from .video_writer import StreamingVideoWriter

    width, height = parse_size(size)
    skip = round(VIDEO_START_OFFSET * sample_rate / FPS)
    with StreamingVideoWriter(path, FPS, width, height, waveform[..., skip:], sample_rate, crf=crf) as writer:
        # Encoding runs beside generation; leaving this block waits for it, so the file holds
        # every chunk made before a stop or failure.
        with BackgroundWriter(lambda chunk: writer.write_frames(chunk.frames, clip_boundary=chunk.ends_clip)) as background:
            for chunk in chunks:
                background.put(chunk)
        return writer.frames_written
