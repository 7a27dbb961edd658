"""Causal block sampler: LiveAvatar's clip-by-clip, block-by-block few-step generation.

A clip of `infer_frames` video frames is `infer_frames // 4` latent frames, split into blocks
of 3 (the last one shorter when 3 does not divide). Each block is denoised in `sample_steps`
flow-matching steps; at step s it attends to the step-s keys/values of the blocks before it
(one ring-buffer cache per step, one clip long) and to the sink. `guide_scale` > 0 adds a
second branch (negative prompt, silenced audio) with caches and sink of its own.

`kv_cache="host"` keeps those per-step caches in host memory instead of on the device
(`host_caches`): the same numbers, for GPUs that cannot hold them.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..finite import require_finite
from ..time_grid import BLOCK_FRAMES, TEMPORAL_STRIDE
from .caches import BlockKVCache, Fp8BlockKVCache, Fp8HeadKVCache, Fp8SinkCache, SinkCache
from .causal_dit import CausalDiT
from .host_caches import HostKVCache, KVStager
from .solvers import SOLVERS, FlowSolver, flow_sigmas

# The sink's lead over the current block is drawn from this range at every DiT call, as in
# LiveAvatar's training; ours comes from the run's seed, so a seed gives one video.
SINK_DISTANCE = (4, 30)
# Where the per-step KV caches live: on the compute device, or in host memory (low VRAM).
KV_CACHE_PLACES = ("device", "host")
# How each clip's noise is drawn: "cpu", a CPU generator in float32 (the same numbers on every
# machine), or "official", as the official pipelines draw it (a generator on the compute
# device, in the model's dtype), so a seed reproduces an official CLI video on a GPU.
NOISE_SOURCES = ("cpu", "official")


def check_kv_cache(place: str) -> None:
    if place not in KV_CACHE_PLACES:
        raise InputError(f"kv_cache must be one of {', '.join(KV_CACHE_PLACES)}, got {place!r}.")


def sink_distance(seed: int, clip: int, block: int, step: int, bounds: tuple[int, int] = SINK_DISTANCE) -> int:
    """The sink's lead for the DiT call at (clip, block, step) of a run seeded with `seed`.

    A pure function of the call's place rather than a stream drawn in call order, so a process
    that runs only some of the steps (pipeline parallelism) draws the same values as one that
    runs them all. String seeds are hashed with SHA-512: the same in every process."""
    return random.Random(f"sink:{seed}:{clip}:{block}:{step}").randint(*bounds)


class GenerationCancelled(Exception):
    """The stop check asked to end the run; everything finished before it is kept."""


@dataclass(frozen=True)
class SamplerSettings:
    sample_steps: int = 4
    infer_frames: int = 48
    sample_solver: str = "euler"
    guide_scale: float = 0.0
    seed: int = 0
    shift: float = 3.0
    sink_distance: tuple[int, int] = SINK_DISTANCE
    noise: str = "cpu"

    def validate(self) -> None:
        if self.infer_frames <= 0 or self.infer_frames % 4:
            raise InputError(f"infer_frames must be a positive multiple of 4 (e.g. 48 or 32), got {self.infer_frames}.")
        if not 1 <= self.sample_steps <= 50:
            raise InputError(
                f"sample_steps must be between 1 and 50 (the distilled model uses 3-5), got {self.sample_steps}."
            )
        if self.sample_solver not in SOLVERS:
            raise InputError(f"sample_solver must be one of {', '.join(SOLVERS)}, got {self.sample_solver!r}.")
        require_finite(
            "sample_guide_scale", self.guide_scale, "Give a number from 0 (off, the official setting) to 20."
        )
        require_finite("shift", self.shift, "Give a positive number (3 is LiveAvatar's).")
        if self.guide_scale < 0:
            raise InputError(f"sample_guide_scale must be >= 0 (0 turns guidance off), got {self.guide_scale}.")
        if self.noise not in NOISE_SOURCES:
            raise InputError(f"noise must be one of {', '.join(NOISE_SOURCES)}, got {self.noise!r}.")

    @property
    def latent_frames(self) -> int:
        return self.infer_frames // TEMPORAL_STRIDE

    def blocks(self) -> list[tuple[int, int]]:
        """(first latent frame within the clip, frame count) of each block."""
        n = self.latent_frames
        return [(start, min(BLOCK_FRAMES, n - start)) for start in range(0, n, BLOCK_FRAMES)]


@dataclass(frozen=True)
class Progress:
    clip: int
    block: int
    num_blocks: int
    step: int
    num_steps: int


class _Branch:
    """One guidance branch: its text, its sink and its per-step caches."""

    def __init__(
        self,
        context: torch.Tensor,
        num_layers: int,
        steps: int,
        frames: int,
        tokens_per_frame: int,
        silent: bool,
        stager: KVStager | None = None,
        fp8: bool = False,
        fp8_attention: bool = False,
    ):
        self.context = context
        self.silent = silent
        fp8 = fp8 and stager is None  # e4m3 caches live on the device only
        self.sink = (Fp8SinkCache if fp8 else SinkCache)(num_layers)
        if stager is not None:
            make_cache = functools.partial(HostKVCache, stager=stager)
        else:
            # fp8 attention reads e4m3 rings with one scale per head as they lie.
            make_cache = (Fp8HeadKVCache if fp8_attention else Fp8BlockKVCache) if fp8 else BlockKVCache
        self.caches = [make_cache(num_layers, frames, tokens_per_frame) for _ in range(steps)]


class CausalSampler:
    def __init__(
        self, dit: CausalDiT, settings: SamplerSettings, device: torch.device | str = "cpu", kv_cache: str = "device"
    ):
        settings.validate()
        check_kv_cache(kv_cache)
        self.dit = dit
        self.settings = settings
        self.device = torch.device(device)
        self.kv_cache = kv_cache
        self.sigmas = flow_sigmas(settings.sample_steps, settings.shift)
        self._branches: list[_Branch] = []
        self._latent_hw: tuple[int, int] | None = None
        self._stager: KVStager | None = None

    def start(
        self,
        ref: torch.Tensor,
        motion: torch.Tensor,
        context: torch.Tensor,
        negative_context: torch.Tensor | None = None,
    ):
        """Prefills the sink(s). ref [1, 16, 1, h, w]; motion [1, 16, 19, h, w] latents;
        contexts: text embeddings [L, 4096] (the negative one used only with guidance)."""
        s = self.settings
        model = self.dit.model
        height, width = ref.shape[-2:]
        self._latent_hw = (height, width)
        tokens = self.dit.tokens_per_frame(height, width)
        contexts = [(context, False)]
        if s.guide_scale > 0:
            if negative_context is None:
                raise InputError("sample_guide_scale > 0 needs a negative prompt embedding (or set it to 0).")
            contexts.append((negative_context, True))
        self.close()
        stager = KVStager(self.device) if self.kv_cache == "host" else None  # shared by every branch and step
        self._stager = stager
        for text, silent in contexts:
            embedded = model.embed_text([text.to(self.device)])
            self._branches.append(
                _Branch(
                    embedded,
                    model.config.num_layers,
                    s.sample_steps,
                    s.latent_frames,
                    tokens,
                    silent,
                    stager,
                    fp8=getattr(self.dit, "kv_fp8", False),
                    fp8_attention=getattr(self.dit, "fp8_attention", False),
                )
            )
        self.replace_sink(ref, motion)

    def close(self) -> None:
        """Ends the run: waits for cache transfers and lets the caches go. Host caches are
        pinned memory, which PyTorch keeps for reuse unless asked to return it; at 688*368
        that is 38 GiB the rest of the machine wants back. Start again to run anew."""
        self._branches = []
        if self._stager is not None:
            self._stager.finish()
            self._stager = None
            if self.device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
                torch.cuda.current_stream(self.device).synchronize()
                torch._C._host_emptyCache()

    def replace_sink(self, ref: torch.Tensor, motion: torch.Tensor) -> None:
        """(Re)fills every branch's sink, e.g. with the first generated frame after clip 0."""
        for branch in self._branches:
            self.dit.prefill_sink(branch.sink, ref.to(self.device), motion.to(self.device), branch.context)

    def clip_noise(self, clip: int) -> torch.Tensor:
        """The clip's starting latents [1, 16, latent_frames, h, w] float32, from seed + clip."""
        height, width = self._latent_hw
        shape = (self.dit.config.in_dim, self.settings.latent_frames, height, width)
        if self.settings.noise == "official":
            device, dtype = self.device, self.dit.model.dtype
        else:
            device, dtype = torch.device("cpu"), torch.float32
        generator = torch.Generator(device).manual_seed(self.settings.seed + clip)
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)[None].float()

    def new_solver(self, history: torch.Tensor | None = None) -> FlowSolver:
        """A block's solver; `history` continues one whose earlier steps ran elsewhere."""
        return FlowSolver(self.sigmas, self.settings.sample_solver, history)

    def generate_clip(
        self,
        clip: int,
        clip_features: torch.Tensor,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (first latent frame within the clip, clean block latents [1, 16, f, h, w])
        for clip number `clip`; `clip_features` [1, 25, audio_dim, infer_frames] are its audio
        features. (A whole run's schedule is `RunSpec.schedule`, which the pipeline runs.)"""
        s = self.settings
        noise = self.clip_noise(clip).to(self.device)
        blocks = s.blocks()
        for block_index, (start, frames) in enumerate(blocks):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"stopped before clip {clip + 1}, block {block_index + 1}")
            after_step = None
            if progress is not None:

                def after_step(step, block=block_index):
                    progress(Progress(clip, block, len(blocks), step, s.sample_steps))

            x = noise[:, :, start : start + frames]
            x = self.denoise(clip, block_index, x, self.new_solver(), range(s.sample_steps), clip_features, after_step)
            yield start, x

    def denoise(
        self,
        clip: int,
        block: int,
        x: torch.Tensor,
        solver: FlowSolver,
        steps: range,
        clip_features: torch.Tensor,
        after_step: Callable[[int], None] | None = None,
        on_input: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Runs `steps` (consecutive step indices) of block `block` of clip `clip` on its
        latents `x`; `clip_features`: the clip's audio features [1, 25, audio_dim, infer_frames].
        `on_input(step, x)` sees each DiT call's latents (what `replay_block` takes)."""
        first_frame, block_features = self._block_inputs(clip, block, clip_features)
        x = x.to(self.device)
        for step in steps:
            if on_input is not None:
                on_input(step, x)
            distance = sink_distance(self.settings.seed, clip, block, step, self.settings.sink_distance)
            velocity = self._velocity(x, solver.timestep(step), step, first_frame, block_features, distance)
            x = solver.step(step, x, velocity)
            if after_step is not None:
                after_step(step)
        return x

    def replay_block(self, clip: int, block: int, inputs: list[torch.Tensor], clip_features: torch.Tensor) -> None:
        """Repeats a block's DiT calls on the latents each step was given (`inputs`, one per
        step, as `denoise`'s `on_input` saw them) only to refill the caches: a resumed run
        rebuilds the caches of the clips before it this way."""
        first_frame, block_features = self._block_inputs(clip, block, clip_features)
        solver = self.new_solver()
        for step, x in enumerate(inputs):
            distance = sink_distance(self.settings.seed, clip, block, step, self.settings.sink_distance)
            self._velocity(x.to(self.device), solver.timestep(step), step, first_frame, block_features, distance)

    def start_caches_at(self, clip: int) -> None:
        """The caches begin at clip `clip` (a resumed run replays from there): what they would
        hold from before it is not read."""
        for branch in self._branches:
            for cache in branch.caches:
                cache.origin = clip * self.settings.latent_frames

    def _block_inputs(self, clip: int, block: int, clip_features: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The block's first latent frame in the run and its audio features on the device."""
        start, frames = self.settings.blocks()[block]
        block_features = clip_features[..., start * TEMPORAL_STRIDE : (start + frames) * TEMPORAL_STRIDE]
        return clip * self.settings.latent_frames + start, block_features.to(self.device)

    def _velocity(self, x, timestep, step, first_frame, block_features, distance):
        outputs = []
        for branch in self._branches:
            features = torch.zeros_like(block_features) if branch.silent else block_features
            outputs.append(
                self.dit.denoise_block(
                    x, timestep, first_frame, branch.context, features, branch.caches[step], branch.sink, distance
                )
            )
        if len(outputs) == 1:
            return outputs[0]
        cond, uncond = outputs
        return uncond + self.settings.guide_scale * (cond - uncond)
