"""One talking-avatar video from loaded models: the steps the ComfyUI nodes expose.

- `encode_audio`: any waveform -> `EncodedAudio` (wav2vec2 features per video frame, kept on
  the CPU in bfloat16, the DiT's own input precision, plus the original track for the mp4).
- `encode_prompt`: prompt (+ negative) -> `PromptEmbeddings`.
- `job_for` (a made `RunSpec`) or `make_job` (its inputs) -> `VideoJob`: the models and the
  run's `RunSpec` (every input checked when it is made), run only when its frames are pulled
  (`frames`), so generation and decoding interleave and memory stays flat. With `gpus` > 1 it
  runs in warm worker processes, one per GPU (`parallel.shared_pools`).
- `render`: pull a job into an mp4 (streamed, with audio) and/or one frame tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import conditioning
from .conditioning import EncodedAudio, PromptEmbeddings
from .errors import InputError
from .limits import check_frames_fit
from .models import LiveAvatarModels
from .parallel.group import check_cpu_workers
from .parallel.models import FileModels
from .parallel.shared_pools import release_shared_pool, shared_pool
from .pipeline import StreamingPipeline, write_video
from .resume import ClipJournal, journal_for
from .run_spec import RunSpec
from .semantics import FrameChunk, VideoSemantics
from .streaming import Progress, SamplerSettings

__all__ = [
    "EncodedAudio",
    "PromptEmbeddings",
    "RenderResult",
    "VideoJob",
    "encode_audio",
    "encode_prompt",
    "job_for",
    "make_job",
    "render",
    "worker_model_files",
]


def encode_audio(
    models: LiveAvatarModels, waveform: torch.Tensor, sample_rate: int, name: str = "audio"
) -> EncodedAudio:
    """Any sample rate, mono or stereo, [channels, samples] or [batch, channels, samples]."""
    placed = functools.partial(models.on_device, "audio_encoder")
    return conditioning.encode_audio(models.audio_encoder, waveform, sample_rate, name, placed)


def encode_prompt(models: LiveAvatarModels, prompt: str, negative_prompt: str | None = None) -> PromptEmbeddings:
    """umT5 embeddings of the prompt (and of the negative prompt, Wan's default when empty)."""
    placed = functools.partial(models.on_device, "text_encoder")
    return conditioning.encode_prompt(models.text_encoder, prompt, negative_prompt, placed)


@dataclass
class VideoJob:
    """A video waiting to be generated. Made by `make_job`, which checks every input."""

    models: LiveAvatarModels
    spec: RunSpec
    audio: EncodedAudio

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def height(self) -> int:
        return self.spec.height

    @property
    def frame_count(self) -> int:
        """Frames the finished video holds."""
        return self.spec.frames

    @property
    def num_clip(self) -> int:
        return self.spec.clips

    @property
    def gpus(self) -> int:
        return self.spec.gpus

    @property
    def total_steps(self) -> int:
        """DiT steps of the whole run (for progress bars)."""
        return self.spec.total_steps

    def rendered_audio(self, frames: int | None = None) -> torch.Tensor:
        """The track under the video (or under its first `frames`), [channels, samples]."""
        return self.audio.track_for_frames(self.frame_count if frames is None else frames)

    def frames(
        self,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        journal: ClipJournal | None = None,
    ) -> Iterator[FrameChunk]:
        """Generates and decodes block by block; frames [N, H, W, 3] in 0..1 on the CPU.

        The same frames either way: in this process, or with `gpus` > 1 in worker processes
        (each runs some of the denoising steps, the last also decodes). `journal`: see
        `resume` (in this process only)."""
        if self.gpus > 1:
            yield from self._frames_from_workers(progress, should_stop)
        else:
            yield from self._frames_here(progress, should_stop, journal)

    def _frames_here(self, progress, should_stop, journal=None) -> Iterator[FrameChunk]:
        release_shared_pool()  # the workers' networks would crowd this process's GPU
        models = self.models
        pipeline = StreamingPipeline(models.dit, models.vae, models.device)
        with models.on_device("dit", "vae"):
            yield from pipeline.stream(self.spec, progress, should_stop, journal)

    def _frames_from_workers(self, progress, should_stop) -> Iterator[FrameChunk]:
        # This process's DiT and VAE stay where they are: the workers load their own copies.
        pool = shared_pool(worker_model_files(self.models), self.gpus, self.models.device.type)
        chunks = pool.run(self.spec, should_stop)
        if progress is not None:
            chunks = _with_block_progress(chunks, self.spec, progress)
        yield from chunks


def worker_model_files(models: LiveAvatarModels) -> FileModels:
    """What worker processes load the DiT and VAE from: the files (without the encoders, which
    they never run), the weight precision and whether the DiT compiles."""
    if models.files.vae is None:
        raise InputError(
            "gpus > 1: the worker processes load the VAE from its file, but this one was given ready-made "
            "(e.g. from core Load VAE): pick the VAE file in the loader instead, or set gpus to 1."
        )
    files = dataclasses.replace(models.files, text_encoder=None, audio_encoder=None)
    return FileModels(files, models.precision, models.dit.kernels.compile_elementwise)


def _with_block_progress(
    chunks: Iterator[FrameChunk], spec: RunSpec, progress: Callable[[Progress], None]
) -> Iterator[FrameChunk]:
    """Progress for steps run in other processes, which report nothing per step: a block's
    frames arriving mean its steps (and those of every block before it) are done. The count
    ends at `RunSpec.total_steps`, as in-process runs do."""
    blocks, steps = spec.schedule.blocks(), spec.settings.sample_steps
    reported = 0

    def report_through(end: int) -> None:
        nonlocal reported
        for clip, block in blocks[reported:end]:
            for step in range(steps):
                progress(Progress(clip, block, spec.schedule.blocks_per_clip, step, steps))
        reported = max(reported, end)

    for chunk in chunks:
        report_through(blocks.index((chunk.clip, chunk.block)) + 1)
        yield chunk
    report_through(len(blocks))


def _check_machine(models: LiveAvatarModels, gpus: int) -> None:
    """Refuses (InputError) more than one process when the machine or the models cannot serve
    them."""
    if gpus == 1:
        return
    if models.files is None:
        raise InputError(
            "gpus > 1: the worker processes load the networks from their files, but these models were not "
            "loaded from files (load them with load_models / Load LiveAvatar Model), or set gpus to 1."
        )
    kind = models.device.type
    if kind not in ("cuda", "cpu"):
        raise InputError(f"gpus > 1 needs CUDA GPUs (or the CPU), but the models run on {kind}: set gpus to 1.")
    if kind == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > visible:
            raise InputError(_too_few_gpus_message(gpus, visible))
    else:
        check_cpu_workers(gpus)


def _too_few_gpus_message(gpus: int, visible: int) -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    limit = f" (CUDA_VISIBLE_DEVICES={devices})" if devices is not None else ""
    return (
        f"gpus = {gpus}, but {visible} CUDA GPU{'' if visible == 1 else 's'} {'is' if visible == 1 else 'are'} "
        f"visible{limit}: set gpus to at most {visible}, or make more GPUs visible (start ComfyUI without "
        "--cuda-device, which shows it only one GPU, and check CUDA_VISIBLE_DEVICES)."
    )


def make_job(
    models: LiveAvatarModels,
    image: torch.Tensor,
    audio: EncodedAudio,
    prompt: PromptEmbeddings,
    size: str,
    settings: SamplerSettings,
    num_clip: int | None = None,
    size_mode: str = "exact",
    trim_to_audio: bool = True,
    gpus: int = 1,
    semantics: VideoSemantics | str | None = None,
    kv_cache: str = "device",
) -> VideoJob:
    """Checks every input now (see `RunSpec.make`), so a bad one fails before minutes of compute.

    num_clip: None or 0 = as many clips as the audio needs. gpus: 1 = this process; more =
    that many worker processes, one per GPU (CPU processes when the models run on the CPU),
    kept warm between runs. kv_cache: where the sampler's attention caches live, "device" or
    "host" memory (the low-VRAM mode; the same video), in every process of the run.
    """
    spec = RunSpec.make(
        image,
        audio.features,
        prompt.positive,
        size,
        settings,
        num_clip=num_clip or None,
        negative_context=prompt.negative,
        trim_to_audio=trim_to_audio,
        semantics=semantics,
        kv_cache=kv_cache,
        gpus=gpus,
        size_mode=size_mode,
    )
    return job_for(models, spec, audio)


def job_for(models: LiveAvatarModels, spec: RunSpec, audio: EncodedAudio) -> VideoJob:
    """The job running `spec` with `models`; refuses (InputError) a `spec.gpus` that this
    machine or these models cannot serve. `audio`: the track the spec's features came from."""
    _check_machine(models, spec.gpus)
    return VideoJob(models, spec, audio)


@dataclass
class RenderResult:
    frames_written: int
    frames: torch.Tensor  # every frame [N, H, W, 3], or only the last one when not kept
    path: Path | None


def render(
    job: VideoJob,
    mp4_path: str | Path | None = None,
    keep_frames: bool = True,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_frames: Callable[[torch.Tensor], None] | None = None,
    crf: int = 19,
    resume: bool = False,
) -> RenderResult:
    """Runs the job, streaming it to an mp4 (with audio) and/or keeping its frames.

    Kept frames live in memory (about 3 MB per 688*368 frame): for long runs write the mp4
    only, which keeps memory flat. A stopped or failed run leaves a playable file with every
    finished clip; the exception propagates.

    An mp4 run in one process leaves a resume sidecar beside the file until it finishes (see
    `resume`); `resume=True` continues the mp4 after its last finished clip when the sidecar's
    inputs are this job's (InputError naming what differs otherwise), or starts it anew when
    it has none. `frames_written` then counts the whole file.
    """
    if mp4_path is None and not keep_frames:
        raise InputError("nothing to render into: ask for the mp4, the frames, or both.")
    if resume and (mp4_path is None or keep_frames):
        raise InputError(
            "resume continues an mp4 and keeps no frames (those of the clips before it are not in "
            "memory): render to the mp4 only, or turn resume off."
        )
    if keep_frames:
        check_frames_fit(job.frame_count, job.width, job.height)
    journal = None if mp4_path is None else journal_for(job, mp4_path, crf, resume)
    kept = torch.empty(job.frame_count, job.height, job.width, 3) if keep_frames else None
    done = 0 if journal is None or journal.written is None else journal.written.frames
    last = None

    def collect(chunks: Iterator[FrameChunk]) -> Iterator[FrameChunk]:
        nonlocal done, last
        for chunk in chunks:
            count = chunk.frames.shape[0]
            if kept is not None:
                kept[done : done + count] = chunk.frames
            done, last = done + count, chunk.frames[-1:]
            if on_frames is not None:
                on_frames(chunk.frames)
            yield chunk

    options = {} if journal is None else {"journal": journal}
    chunks = collect(job.frames(progress, should_stop, **options))
    if mp4_path is not None:
        write_video(
            chunks, mp4_path, job.audio.track, job.audio.sample_rate, (job.width, job.height), crf=crf, journal=journal
        )
        if journal is not None:
            journal.finish()
    else:
        for _ in chunks:
            pass
    frames = kept[:done] if kept is not None else last
    return RenderResult(done, frames, None if mp4_path is None else Path(mp4_path))
