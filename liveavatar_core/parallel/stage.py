"""One rank's part of a pipeline-parallel run (timestep-forcing pipeline parallelism).

Every rank calls `run_stage` with the same `RunSpec` and walks the same schedule. Blocks flow
down the pipeline: rank 0 draws a block's noise, runs its steps and sends the latents (with
the solver's history) on; each rank runs its own steps with its own KV caches and sink; the
last rank decodes and yields the frames. While rank r works on block b, rank r+1 works on
block b-1.

The sink's inputs flow back: the decoding rank encodes the reference and motion as the run's
semantics say (and, after `Schedule.roll_after`, the rolled sink) and sends them to every rank
with steps, which prefill their own sinks. Caches, sink distances and noise follow
`CausalSampler` exactly, so the frames equal `StreamingPipeline.stream`'s for the same spec.

A stop request is seen by rank 0 between blocks: it sends STOP down instead of a block, the
blocks already under way are finished and yielded, and every rank raises GenerationCancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..pipeline import stopped_before
from ..run_spec import RunSpec, WorkItem
from ..semantics import FrameChunk
from ..streaming import CausalDiT, CausalSampler
from ..time_grid import clip_features
from . import messages
from .messages import Kind, Message
from .models import RankModels
from .plan import StagePlan


def run_stage(
    spec: RunSpec,
    plan: StagePlan,
    rank: int,
    device: torch.device,
    models: RankModels,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[FrameChunk]:
    """Runs `rank`'s stage of `spec`; yields FrameChunks on the decoding rank only.

    `should_stop` is asked on rank 0 before each block. Raises GenerationCancelled on every
    working rank when it turns true; idle ranks return at once."""
    stage = plan.stage(rank)
    if stage is None:
        return
    settings, schedule = spec.settings, spec.schedule
    previous, following = plan.neighbours(rank)
    sampler = CausalSampler(CausalDiT(models.dit()), settings, device, spec.kv_cache) if stage.steps else None
    output = None
    if stage.decodes:
        output = spec.semantics.video(models.vae(), spec.reference, spec.frames, schedule.blocks_per_clip)

    def share_sink(make):
        """The decoding rank makes the sink's inputs; every rank with steps gets them."""
        if output is not None:
            ref, motion = make()
            for r in plan.step_ranks:
                if r != rank:
                    messages.send(Message(Kind.SINK, tensors=(ref, motion)), r, device)
        else:
            ref, motion = _expect(messages.recv(plan.decoder, device), Kind.SINK).tensors
        return ref, motion

    def stop(item: WorkItem):
        if following is not None:
            messages.send(Message(Kind.STOP, item.clip, item.block), following, device)
        raise stopped_before(item)

    try:
        ref, motion = share_sink(output.sink_inputs if output is not None else None)
        if sampler is not None:
            sampler.start(ref, motion, spec.context, spec.negative_context)
        for item in schedule.items:
            clip, block = item.clip, item.block
            if previous is None:
                if should_stop is not None and should_stop():
                    stop(item)
                if block == 0:
                    noise = sampler.clip_noise(clip).to(device)
                x, history = noise[:, :, item.start : item.start + item.frames], None
            else:
                message = messages.recv(previous, device)
                if message.kind == Kind.STOP:
                    stop(WorkItem(message.clip, message.block, 0, 0))
                _expect(message, Kind.BLOCK, clip, block)
                x, history = message.tensors[0], (message.tensors[1] if len(message.tensors) > 1 else None)
            if sampler is not None:
                if block == 0:
                    features = clip_features(spec.audio_features, clip, settings.infer_frames)
                solver = sampler.new_solver(history)
                x = sampler.denoise(clip, block, x, solver, stage.steps, features)
                history = solver.history
            if output is not None:
                chunk = output.decode(clip, block, x)
                if chunk is not None:
                    yield chunk
            else:
                tensors = (x,) if history is None else (x, history)
                messages.send(Message(Kind.BLOCK, clip, block, tensors), following, device)
            if item == schedule.roll_after:
                ref, motion = share_sink(output.rolled_sink if output is not None else None)
                if sampler is not None:
                    sampler.replace_sink(ref, motion)
        if output is not None and not output.finished:
            raise RuntimeError(f"the block plan ended with {output.frames_left} of {spec.frames} frames missing")
    finally:
        if sampler is not None:
            sampler.close()
        if output is not None:
            output.close()


def _expect(message: Message, kind: Kind, clip: int | None = None, block: int | None = None) -> Message:
    """Guards the protocol: a mismatch is a bug, never something a user could fix."""
    if message.kind != kind or (clip is not None and (message.clip, message.block) != (clip, block)):
        raise RuntimeError(
            f"pipeline protocol error: got a {message.kind.name} message for clip {message.clip}, block "
            f"{message.block}; expected {kind.name} for clip {clip}, block {block}"
        )
    return message
