"""The streaming LiveAvatar pipeline in one process: a `RunSpec` in, decoded frames out, clip
by clip, with flat memory.

Flow per run:
1. The run's semantics (see `semantics.py`: `official-multi-gpu` by default, or
   `official-single-gpu`) encode the fitted portrait into the sink's reference and motion
   latents exactly as that official pipeline does.
2. The sampler prefills its sink and denoises the spec's schedule, block after block.
3. Each finished block is decoded at once by the semantics' streaming decode and handed to
   the caller; nothing per clip is kept afterwards beyond the fixed motion window.
4. After clip 0 the sink rolls (`Schedule.roll_after`): the first generated latent frame
   becomes the reference. Later clips see earlier ones through the KV caches.

The video starts `VIDEO_START_OFFSET` frames into clip 0 (official: clip 0 yields 45 frames,
later clips 48); the audio under those frames is skipped too, keeping lips in sync (the
official code muxes the audio from t=0, 120 ms early). See `time_grid`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from .dit import WanS2VTransformer
from .overlapped_decode import DecodeQueue
from .resume import ClipJournal
from .run_spec import RunSpec, WorkItem
from .semantics import FrameChunk
from .sizing import parse_size
from .streaming import CausalDiT, CausalSampler, GenerationCancelled, Progress
from .time_grid import FPS, clip_features, start_offset_samples
from .vae import WanVAE


class StreamingPipeline:
    def __init__(
        self,
        dit: WanS2VTransformer,
        vae: WanVAE,
        device: torch.device | str = "cpu",
        overlap_decode: bool | None = None,
    ):
        """overlap_decode: decode each block while the next is denoised (see `overlapped_decode`);
        None = as the environment's LIVEAVATAR_OVERLAP_DECODE says (off unless "1"): on one
        H200 at 688*368 it ran at 0.97x the in-line speed, the two competing for the same GPU."""
        self.dit = dit
        self.vae = vae
        self.device = torch.device(device)
        if overlap_decode is None:
            overlap_decode = os.environ.get("LIVEAVATAR_OVERLAP_DECODE", "0") == "1"
        self.overlap_decode = overlap_decode

    def stream(
        self,
        spec: RunSpec,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        journal: ClipJournal | None = None,
    ) -> Iterator[FrameChunk]:
        """Yields the run's decoded frames block by block.

        Raises GenerationCancelled when `should_stop()` turns true (checked before each block);
        the blocks finished before it are yielded first. `journal` (see `resume`) records what
        each clip leaves for the next, and with a resume point runs only the clips after it."""
        settings, schedule = spec.settings, spec.schedule
        sampler = CausalSampler(CausalDiT(self.dit), settings, self.device, spec.kv_cache)
        with (
            spec.semantics.video(self.vae, spec.reference, spec.frames, schedule.blocks_per_clip) as video,
            DecodeQueue(video.decode, self.device, self.overlap_decode) as decoder,
        ):
            try:
                sampler.start(*video.sink_inputs(), spec.context, spec.negative_context)
                items = schedule.items if journal is None else journal.begin(sampler, video, spec)
                for item in items:
                    if should_stop is not None and should_stop():
                        raise stopped_before(item)
                    if item.block == 0:
                        noise = sampler.clip_noise(item.clip).to(self.device)
                        features = clip_features(spec.audio_features, item.clip, settings.infer_frames)
                    x = noise[:, :, item.start : item.start + item.frames]
                    after_step = None if progress is None else _reporter(progress, item, spec)
                    latents = sampler.denoise(
                        item.clip,
                        item.block,
                        x,
                        sampler.new_solver(),
                        range(settings.sample_steps),
                        features,
                        after_step,
                        None if journal is None else journal.on_input(item),
                    )
                    if journal is not None:
                        journal.block_done(item, latents)
                    yield from decoder.submit(item.clip, item.block, latents)
                    if item == schedule.roll_after:
                        yield from decoder.drain()  # the sink roll needs clip 0's frames
                        sampler.replace_sink(*video.rolled_sink())
            except GenerationCancelled:
                yield from decoder.drain()  # blocks finished before the stop are kept
                raise
            finally:
                sampler.close()
            yield from decoder.drain()


def stopped_before(item: WorkItem) -> GenerationCancelled:
    return GenerationCancelled(f"stopped before clip {item.clip + 1}, block {item.block + 1}")


def _reporter(progress: Callable[[Progress], None], item: WorkItem, spec: RunSpec) -> Callable[[int], None]:
    def after_step(step: int) -> None:
        progress(Progress(item.clip, item.block, spec.schedule.blocks_per_clip, step, spec.settings.sample_steps))

    return after_step


def write_video(
    chunks: Iterator[FrameChunk],
    path,
    waveform: torch.Tensor,
    sample_rate: int,
    size: str | tuple[int, int],
    crf: int = 19,
    journal: ClipJournal | None = None,
) -> int:
    """Streams `chunks` into an mp4 with the audio muxed; returns the frame count written.

    The waveform is shifted by `VIDEO_START_OFFSET` frames so it lines up with the first
    generated frame. Frames are encoded on a thread while the next ones are generated; a run
    stopped or failing at any point leaves a playable file with every clip made before it
    (the exception still propagates). With `journal` (see `resume`) the file continues what
    the journal's resume point wrote, and each clip on disk updates its sidecar.
    """
    from .background_writer import BackgroundWriter
    from .video_writer import StreamingVideoWriter

    width, height = parse_size(size)
    skip = start_offset_samples(sample_rate)
    append_to = None if journal is None else journal.written
    with StreamingVideoWriter(
        path, FPS, width, height, waveform[..., skip:], sample_rate, crf=crf, append_to=append_to
    ) as writer:

        def write(chunk: FrameChunk) -> None:
            writer.write_frames(chunk.frames, clip_boundary=chunk.ends_clip)
            if journal is not None and chunk.ends_clip:
                journal.clip_written(chunk.clip, writer.written)

        # Encoding runs beside generation; leaving this block waits for it, so the file holds
        # every chunk made before a stop or failure.
        with BackgroundWriter(write) as background:
            for chunk in chunks:
                background.put(chunk)
        return writer.frames_written
