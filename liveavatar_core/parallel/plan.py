"""Who does what in a pipeline-parallel run, and which blocks the run computes.

Ranks own consecutive denoising steps and pass each block's latents on; the last rank always
decodes with the VAE. With more ranks than steps, ranks 0..S-1 take one step each and the last
rank only decodes (LiveAvatar's own layout at 4 steps on 5 GPUs); the ranks in between idle.
With as many ranks as steps or fewer, the steps are split into runs as even as possible, the
longer runs first, and the last rank also decodes, so it gets the shortest run. Keeping the
VAE on the last rank whatever the step count lets a warm worker pool serve any step count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Stage:
    rank: int
    steps: range  # the denoising step indices this rank runs (may be empty)
    decodes: bool


@dataclass(frozen=True)
class StagePlan:
    world_size: int
    sample_steps: int
    stages: tuple[Stage, ...]  # the working ranks, in pipeline order

    def stage(self, rank: int) -> Stage | None:
        """The rank's stage, or None when it idles for this step count."""
        return next((s for s in self.stages if s.rank == rank), None)

    def neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """(rank before, rank after) in the pipeline."""
        ranks = [s.rank for s in self.stages]
        i = ranks.index(rank)
        return (ranks[i - 1] if i > 0 else None, ranks[i + 1] if i + 1 < len(ranks) else None)

    @property
    def step_ranks(self) -> list[int]:
        return [s.rank for s in self.stages if s.steps]

    @property
    def decoder(self) -> int:
        return self.stages[-1].rank


def plan_stages(world_size: int, sample_steps: int) -> StagePlan:
    if world_size < 1:
        raise InputError(f"the pipeline needs at least 1 process, got {world_size}.")
    if sample_steps < 1:
        raise InputError(f"sample_steps must be at least 1, got {sample_steps}.")
    last = world_size - 1
    if world_size > sample_steps:
        stages = [Stage(r, range(r, r + 1), False) for r in range(sample_steps)]
        stages.append(Stage(last, range(0), True))
    else:
        base, extra = divmod(sample_steps, world_size)
        stages, first = [], 0
        for rank in range(world_size):
            count = base + (rank < extra)
            stages.append(Stage(rank, range(first, first + count), rank == last))
            first += count
    return StagePlan(world_size, sample_steps, tuple(stages))
