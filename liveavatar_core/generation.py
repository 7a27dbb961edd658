"""One talking-avatar video from loaded models: the steps the ComfyUI nodes expose.

- `encode_audio`: any waveform -> `EncodedAudio` (wav2vec2 features per video frame, kept on
  the CPU in bfloat16, the DiT's own input precision, plus the original track for the mp4).
- `encode_prompt`: prompt (+ negative) -> `PromptEmbeddings`.
- `VideoJob`: everything one video needs, checked when it is made and run only when its
  frames are pulled (`frames`), so generation and decoding interleave and memory stays flat.
  With `gpus` > 1 it runs in warm worker processes, one per GPU (`parallel.shared_pools`).
- `render`: pull a job into an mp4 (streamed, with audio) and/or one frame tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio_io import is_silent, limit_peak, to_16k_mono
from .errors import InputError
from .limits import check_frames_fit
from .models import LiveAvatarModels
from .parallel import Job
from .parallel.group import check_cpu_workers
from .parallel.models import ModelFiles as WorkerModelFiles
from .parallel.shared_pools import release_shared_pool, shared_pool
from .pipeline import (
    FPS,
    VIDEO_START_OFFSET,
    FrameChunk,
    RunPlan,
    StreamingPipeline,
    clips_for_frames,
    frames_for_run,
    parse_size,
    plan_run,
    planned_blocks,
    write_video,
)
from .semantics import VideoSemantics
from .sizing import SIZE_MODES, area_fit_size
from .streaming import Progress, SamplerSettings

# Wan2.2's default negative prompt (its `sample_neg_prompt`), used when guidance is on and
# the user leaves the negative prompt empty.
WAN_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FEATURE_DTYPE = torch.bfloat16
MIN_SIDE = 64


@dataclass(frozen=True)
class EncodedAudio:
    """features: [1, layers, dim, frames] (one window per video frame at 25 fps);
    track: the speech as given, [channels <= 2, samples] at `sample_rate`, for the mp4."""

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
        skip = round(VIDEO_START_OFFSET * self.sample_rate / FPS)
        length = round(frames * self.sample_rate / FPS)
        track = self.track[:, skip : skip + length]
        if track.shape[-1] < length:
            track = torch.cat([track, track.new_zeros(track.shape[0], length - track.shape[-1])], dim=-1)
        return track


@dataclass(frozen=True)
class PromptEmbeddings:
    positive: torch.Tensor
    negative: torch.Tensor | None = None


def encode_audio(models: LiveAvatarModels, waveform: torch.Tensor, sample_rate: int, name: str = "audio") -> EncodedAudio:
    """Any sample rate, mono or stereo, [channels, samples] or [batch, channels, samples]."""
    wave16k = to_16k_mono(waveform, sample_rate, name=name)
    if is_silent(wave16k):
        raise InputError(
            f"{name} is silent (its peak is below -80 dBFS), so there is no speech to drive the face. "
            "Check the file or its volume; for a still speaker, use a recording of room noise."
        )
    with models.on_device("audio_encoder"):
        features = models.audio_encoder.features_for_video(wave16k, FPS)
    return EncodedAudio(features.to("cpu", FEATURE_DTYPE), _playable_track(waveform), int(sample_rate))


def _playable_track(waveform: torch.Tensor) -> torch.Tensor:
    """[channels, samples] float32 with 1 or 2 channels (more are mixed down to mono)."""
    track = torch.as_tensor(waveform).detach().float().cpu()
    if track.dim() == 3:
        track = track[0]
    if track.dim() == 1:
        track = track[None]
    return limit_peak(track if track.shape[0] <= 2 else track.mean(dim=0, keepdim=True))


def encode_prompt(models: LiveAvatarModels, prompt: str, negative_prompt: str | None = None) -> PromptEmbeddings:
    """umT5 embeddings of the prompt (and of the negative prompt, Wan's default when empty)."""
    if not prompt.strip():
        raise InputError("the prompt is empty: describe the speaker and the scene (one or two sentences).")
    negative = negative_prompt if negative_prompt and negative_prompt.strip() else WAN_NEGATIVE_PROMPT
    with models.on_device("text_encoder"):
        positive_emb, negative_emb = models.text_encoder.encode([prompt, negative])
    return PromptEmbeddings(positive_emb.cpu(), negative_emb.cpu())


@dataclass
class VideoJob:
    """A video waiting to be generated. Made by `make_job`, which checks every input."""

    models: LiveAvatarModels
    image: torch.Tensor
    audio: EncodedAudio
    prompt: PromptEmbeddings
    settings: SamplerSettings
    plan: RunPlan
    trim_to_audio: bool = True
    gpus: int = 1  # 1: this process; more: that many warm worker processes, one per GPU
    semantics: VideoSemantics = VideoSemantics()  # which official pipeline the video follows

    @property
    def width(self) -> int:
        return self.plan.width

    @property
    def height(self) -> int:
        return self.plan.height

    @property
    def frame_count(self) -> int:
        """Frames the finished video holds."""
        return self.plan.frames

    @property
    def num_clip(self) -> int:
        return self.plan.clips

    @property
    def total_steps(self) -> int:
        """DiT steps of the whole run (for progress bars)."""
        return len(planned_blocks(self.plan, self.settings)) * self.settings.sample_steps

    def rendered_audio(self, frames: int | None = None) -> torch.Tensor:
        """The track under the video (or under its first `frames`), [channels, samples]."""
        return self.audio.track_for_frames(self.frame_count if frames is None else frames)

    def frames(
        self,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[FrameChunk]:
        """Generates and decodes block by block; frames [N, H, W, 3] in 0..1 on the CPU.

        The same frames either way: in this process, or with `gpus` > 1 in worker processes
        (each runs some of the denoising steps, the last also decodes)."""
        if self.gpus > 1:
            yield from self._frames_from_workers(progress, should_stop)
        else:
            yield from self._frames_here(progress, should_stop)

    def _frames_here(self, progress, should_stop) -> Iterator[FrameChunk]:
        release_shared_pool()  # the workers' networks would crowd this process's GPU
        models = self.models
        pipeline = StreamingPipeline(models.dit, models.vae, models.device, kv_cache=models.kv_cache)
        with models.on_device("dit", "vae"):
            yield from pipeline.stream(
                self.image,
                self.audio.features,
                self.prompt.positive,
                (self.width, self.height),
                self.settings,
                num_clip=self.num_clip,
                negative_context=self.prompt.negative,
                progress=progress,
                should_stop=should_stop,
                trim_to_audio=self.trim_to_audio,
                semantics=self.semantics,
            )

    def _frames_from_workers(self, progress, should_stop) -> Iterator[FrameChunk]:
        # This process's DiT and VAE stay where they are: the workers load their own copies.
        pool = shared_pool(worker_model_files(self.models), self.gpus, self.models.device.type)
        job = Job(self.image, self.audio.features, self.prompt.positive, (self.width, self.height), self.settings,
                  self.num_clip, self.prompt.negative, self.trim_to_audio, self.models.kv_cache, self.semantics)
        chunks = pool.run(job, should_stop)
        if progress is not None:
            chunks = _with_block_progress(chunks, planned_blocks(self.plan, self.settings), self.settings, progress)
        yield from chunks


def worker_model_files(models: LiveAvatarModels) -> WorkerModelFiles:
    """The files (and weight dtype) worker processes load the DiT and VAE from."""
    files = models.files
    if files.vae is None:
        raise InputError("gpus > 1: the worker processes load the VAE from its file, but this one was given ready-made "
                         "(e.g. from core Load VAE): pick the VAE file in the loader instead, or set gpus to 1.")
    lora = None if files.lora is None else Path(files.lora)
    return WorkerModelFiles(Path(files.dit), Path(files.vae), lora, files.lora_strength, models.dtype)


def _with_block_progress(
    chunks: Iterator[FrameChunk],
    blocks: list[tuple[int, int]],
    settings: SamplerSettings,
    progress: Callable[[Progress], None],
) -> Iterator[FrameChunk]:
    """Progress for steps run in other processes, which report nothing per step: a block's
    frames arriving mean its steps (and those of every block before it) are done. The count
    ends at `VideoJob.total_steps`, as in-process runs do."""
    reported = 0

    def report_through(end: int) -> None:
        nonlocal reported
        for clip, block in blocks[reported:end]:
            for step in range(settings.sample_steps):
                progress(Progress(clip, block, len(settings.blocks()), step, settings.sample_steps))
        reported = max(reported, end)

    for chunk in chunks:
        report_through(blocks.index((chunk.clip, chunk.block)) + 1)
        yield chunk
    report_through(len(blocks))


def _check_gpus(models: LiveAvatarModels, gpus: int) -> None:
    """Refuses (InputError) a process count the machine or the models cannot serve."""
    if gpus < 1:
        raise InputError(f"gpus must be at least 1 (1 = this process), got {gpus}.")
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
) -> VideoJob:
    """Checks every input now, so a bad one fails before minutes of compute.

    num_clip: None or 0 = as many clips as the audio needs. size_mode: 'exact' (resize and
    centre-crop the image to `size`) or 'official_area' (`size` is an area budget; the
    image's aspect ratio decides the shape, as in the official CLI). gpus: 1 = this process;
    more = that many worker processes, one per GPU (CPU processes when the models run on the
    CPU), kept warm between runs. semantics: which official pipeline's conditioning and
    decoding the video follows (`VideoSemantics` or its name; default `official-multi-gpu`).
    """
    settings.validate()
    semantics = VideoSemantics.of(semantics)
    _check_gpus(models, gpus)
    if image.dim() == 4:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 16:
        raise InputError(f"reference image must be one RGB image of at least 16*16 pixels, got shape {tuple(image.shape)}.")
    width, height = parse_size(size)
    if size_mode == "official_area":
        height, width = area_fit_size(image.shape[0], image.shape[1], width * height)
        if min(height, width) < 64:
            raise InputError(f"reference image {image.shape[1]}*{image.shape[0]} is too small for size_mode 'official_area'; use 'exact'.")
    elif size_mode != "exact":
        raise InputError(f"size_mode must be one of {', '.join(SIZE_MODES)}, got {size_mode!r}.")
    if min(width, height) < MIN_SIDE:
        raise InputError(f"size {width}*{height} is too small: both sides must be at least {MIN_SIDE} pixels "
                         "(the motion context is packed in 8*8-latent patches).")
    if num_clip is not None and num_clip < 0:
        raise InputError(f"num_clip must be at least 1, or 0 for 'as many as the audio needs', got {num_clip}.")
    if settings.guide_scale > 0 and prompt.negative is None:
        raise InputError("sample_guide_scale > 0 needs a negative prompt: encode it with EncodePrompt, or set the scale to 0.")
    plan = plan_run(audio.features, (width, height), settings, num_clip or None, trim_to_audio)
    return VideoJob(models, image, audio, prompt, settings, plan, trim_to_audio, gpus, semantics)


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
) -> RenderResult:
    """Runs the job, streaming it to an mp4 (with audio) and/or keeping its frames.

    Kept frames live in memory (about 3 MB per 688*368 frame): for long runs write the mp4
    only, which keeps memory flat. A stopped or failed run leaves a playable file with every
    finished clip; the exception propagates.
    """
    if mp4_path is None and not keep_frames:
        raise InputError("nothing to render into: ask for the mp4, the frames, or both.")
    if keep_frames:
        check_frames_fit(job.frame_count, job.width, job.height)
    kept = torch.empty(job.frame_count, job.height, job.width, 3) if keep_frames else None
    done, last = 0, None

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

    chunks = collect(job.frames(progress, should_stop))
    if mp4_path is not None:
        write_video(chunks, mp4_path, job.audio.track, job.audio.sample_rate, (job.width, job.height), crf=crf)
    else:
        for _ in chunks:
            pass
    frames = kept[:done] if kept is not None else last
    return RenderResult(done, frames, None if mp4_path is None else Path(mp4_path))
