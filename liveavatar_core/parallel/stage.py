"""One rank's part of a pipeline-parallel run (timestep-forcing pipeline parallelism).

Every rank calls `run_stage` with the same `Job`. Blocks flow down the pipeline: rank 0 draws
a block's noise, runs its steps and sends the latents (with the solver's history) on; each
rank runs its own steps with its own KV caches and sink; the last rank decodes and yields the
frames. While rank r works on block b, rank r+1 works on block b-1.

The sink's inputs flow back: the decoding rank encodes the reference and motion as the run's
semantics say (and, once clip 0 is decoded, the rolled sink) and sends them to every rank with
steps, which prefill their own sinks. Caches, sink distances and noise follow `CausalSampler` exactly, so the frames equal
`StreamingPipeline.stream`'s for the same inputs.

A stop request is seen by rank 0 between blocks: it sends STOP down instead of a block, the
blocks already under way are finished and yielded, and every rank raises GenerationCancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..pipeline import FrameChunk, RunPlan, clip_features, fit_reference, plan_run, planned_blocks
from ..semantics import VideoSemantics
from ..streaming import CausalDiT, CausalSampler, GenerationCancelled, SamplerSettings
from ..streaming.sampler import check_kv_cache
from . import messages
from .messages import BLOCK, SINK, STOP, Message
from .models import RankModels
from .plan import StagePlan


@dataclass
class Job:
    """One video's inputs (those of `StreamingPipeline.stream`), given to every rank."""

    image: torch.Tensor
    audio_features: torch.Tensor
    context: torch.Tensor
    size: str | tuple[int, int]
    settings: SamplerSettings
    num_clip: int | None = None
    negative_context: torch.Tensor | None = None
    trim_to_audio: bool = True
    kv_cache: str = "device"  # or "host": each rank keeps its steps' caches in host memory
    semantics: VideoSemantics = VideoSemantics()

    def plan(self) -> RunPlan:
        """Checks the inputs (InputError) and counts the run's clips and frames."""
        if self.settings.guide_scale > 0 and self.negative_context is None:
            raise InputError("sample_guide_scale > 0 needs a negative prompt embedding (or set it to 0).")
        check_kv_cache(self.kv_cache)
        self.semantics.validate()
        return plan_run(self.audio_features, self.size, self.settings, self.num_clip, self.trim_to_audio)


def run_stage(
    job: Job,
    plan: StagePlan,
    rank: int,
    device: torch.device,
    models: RankModels,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[FrameChunk]:
    """Runs `rank`'s stage of `job`; yields FrameChunks on the decoding rank only.

    `should_stop` is asked on rank 0 before each block. Raises GenerationCancelled on every
    working rank when it turns true; idle ranks return at once."""
    run = job.plan()
    stage = plan.stage(rank)
    if stage is None:
        return
    settings = job.settings
    work = planned_blocks(run, settings)
    rolls = job.semantics.rolls_sink(work[-1][0] + 1)
    last_block = len(settings.blocks()) - 1
    previous, following = plan.neighbours(rank)
    sampler = CausalSampler(CausalDiT(models.dit()), settings, device, job.kv_cache) if stage.steps else None
    output = None
    if stage.decodes:
        pixels = fit_reference(job.image, run.width, run.height)
        output = job.semantics.video(models.vae(), pixels, run.frames, len(settings.blocks()))

    def share_sink(make):
        """The decoding rank makes the sink's inputs; every rank with steps gets them."""
        if output is not None:
            ref, motion = make()
            for r in plan.step_ranks:
                if r != rank:
                    messages.send(Message(SINK, tensors=(ref, motion)), r, device)
        else:
            ref, motion = _expect(messages.recv(plan.decoder, device), SINK).tensors
        return ref, motion

    def stop(clip, block):
        if following is not None:
            messages.send(Message(STOP, clip, block), following, device)
        raise GenerationCancelled(f"stopped before clip {clip + 1}, block {block + 1}")

    try:
        ref, motion = share_sink(output.sink_inputs if output is not None else None)
        if sampler is not None:
            sampler.start(ref, motion, job.context, job.negative_context)
        for clip, block in work:
            if previous is None:
                if should_stop is not None and should_stop():
                    stop(clip, block)
                if block == 0:
                    noise = sampler.clip_noise(clip).to(device)
                start, frames = settings.blocks()[block]
                x, history = noise[:, :, start : start + frames], None
            else:
                message = messages.recv(previous, device)
                if message.kind == STOP:
                    stop(message.clip, message.block)
                _expect(message, BLOCK, clip, block)
                x, history = message.tensors[0], (message.tensors[1] if len(message.tensors) > 1 else None)
            if sampler is not None:
                if block == 0:
                    audio = clip_features(job.audio_features, clip, settings.infer_frames)
                solver = sampler.new_solver(history)
                x = sampler.denoise(clip, block, x, solver, stage.steps, audio)
                history = solver.history
            if output is not None:
                chunk = output.decode(clip, block, x)
                if chunk is not None:
                    yield chunk
            else:
                tensors = (x,) if history is None else (x, history)
                messages.send(Message(BLOCK, clip, block, tensors), following, device)
            if rolls and clip == 0 and block == last_block:
                ref, motion = share_sink(output.rolled_sink if output is not None else None)
                if sampler is not None:
                    sampler.replace_sink(ref, motion)
        if output is not None and not output.finished:
            raise RuntimeError(f"the block plan ended with {output.frames_left} of {run.frames} frames missing")
    finally:
        if sampler is not None:
            sampler.close()
        if output is not None:
            output.close()


def _expect(message: Message, kind: int, clip: int | None = None, block: int | None = None) -> Message:
    """Guards the protocol: a mismatch is a bug, never something a user could fix."""
    if message.kind != kind or (clip is not None and (message.clip, message.block) != (clip, block)):
        raise RuntimeError(
            f"pipeline protocol error: got message kind {message.kind} for clip {message.clip}, block "
            f"{message.block}; expected kind {kind} for clip {clip}, block {block}"
        )
    return message
