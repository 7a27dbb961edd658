"""Causal block generation against full recomputation, and the sampler's user-facing rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import OFFICIAL_TINY, relative_error
from liveavatar_core.dit import attention as dispatch
from liveavatar_core.dit import load_dit
from liveavatar_core.dit.rope import rope_cos_sin
from liveavatar_core.errors import InputError
from liveavatar_core.streaming import CausalDiT, CausalSampler, GenerationCancelled, SamplerSettings
from liveavatar_core.streaming.caches import Fp8HeadKVCache

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    return load_dit(OFFICIAL_TINY / "Wan2.2-S2V-tiny", dtype=torch.float32)


def sink_only_mask(video_tokens: int, total: int) -> torch.Tensor:
    """Video tokens see everything; sink tokens see only the sink (LiveAvatar's prefill)."""
    mask = torch.ones(total, total, dtype=torch.bool)
    mask[video_tokens:, :video_tokens] = False
    return mask


def test_one_block_without_cache_equals_plain_s2v_forward(model, golden):
    """A whole clip as one block, at the start of generation, is the plain S2V forward except
    that LiveAvatar's sink tokens never look at the video; with that mask they agree."""
    dit = CausalDiT(model)
    settings = SamplerSettings(infer_frames=12, sample_steps=1, sink_distance=(4, 4))
    sampler = CausalSampler(dit, settings)
    ref, motion = golden["ref"][None], golden["motion"][None]
    sampler.start(ref, motion, golden["context"])
    branch = sampler._branches[0]
    causal = dit.denoise_block(
        golden["x"][None], 700.0, 0, branch.context, golden["audio"], branch.caches[0], branch.sink, 4
    )

    video_tokens = 3 * 16
    total = video_tokens + branch.sink.positions.shape[0]
    mask = sink_only_mask(video_tokens, total)
    plain = model(
        golden["x"][None],
        golden["t"],
        [golden["context"]],
        ref,
        motion,
        golden["audio"],
        kv_hook=lambda layer: lambda raw_k, k, v: (k, v, mask),
    )
    error = relative_error(causal, plain)
    print(f"\ncausal single block vs plain S2V forward (sink-only mask): relative error {error:.3e}")
    assert error <= TOLERANCE
    unmasked = model(golden["x"][None], golden["t"], [golden["context"]], ref, motion, golden["audio"])
    print(f"without the mask (sink also sees the video): relative difference {relative_error(causal, unmasked):.3e}")


class Recorder:
    """Wraps CausalDiT.denoise_block to keep every call's inputs and output."""

    def __init__(self, dit: CausalDiT):
        self.calls = []
        original = dit.denoise_block

        def record(latents, timestep, first_frame, context, audio, cache, sink, distance, cond=None):
            out = original(latents, timestep, first_frame, context, audio, cache, sink, distance, cond)
            self.calls.append(
                dict(
                    latents=latents,
                    t=timestep,
                    first=first_frame,
                    audio=audio,
                    out=out,
                    distance=distance,
                    sink=sink,
                    context=context,
                )
            )
            return out

        dit.denoise_block = record


def recompute_without_cache(model, calls, window_frames, ref, motion):
    """Runs all blocks' inputs of one denoising step as one sequence with a block-causal,
    windowed mask plus the sink tokens, and returns the velocity of the last block."""
    first = calls[-1]
    video = torch.cat([c["latents"] for c in calls], dim=2)
    frames, height, width = video.shape[2:]
    per_frame = 16
    tokens = model.embed_video(video) + model.trainable_cond_mask.weight[0]
    sink_tokens, sink_positions = model.embed_sink(ref, motion)
    x = torch.cat([tokens, sink_tokens], dim=1).float()
    positions = torch.cat([model.video_positions(frames, height, width), sink_positions])
    rope = rope_cos_sin(positions, model.config.head_dim)
    video_tokens = tokens.shape[1]
    total = x.shape[1]
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[video_tokens:, video_tokens:] = True
    mask[:video_tokens, video_tokens:] = True
    start = 0
    for c in calls:
        f = c["latents"].shape[2]
        end = start + f
        lo = max(0, end - window_frames)
        mask[start * per_frame : end * per_frame, lo * per_frame : end * per_frame] = True
        start = end
    glob, local = zip(*(model.embed_audio(c["audio"]) for c in calls))
    audio = torch.cat(glob, dim=1), torch.cat(local, dim=1)
    head_emb, modulation = model.embed_time(torch.tensor([first["t"], 0.0]))
    modulation = torch.stack([modulation[:1], modulation[1:]], dim=1)
    out = model.run_blocks(
        x,
        modulation,
        [video_tokens, total - video_tokens],
        rope,
        first["context"],
        audio,
        video_tokens,
        lambda layer: lambda raw_k, k, v: (k, v, mask),
    )
    out = model.head(out[:, :video_tokens], head_emb[:1, None], [video_tokens])
    velocity = model.unpatchify(out.float(), frames, height, width)
    return velocity[:, :, -calls[-1]["latents"].shape[2] :]


@pytest.mark.slow
@pytest.mark.parametrize("infer_frames, clips", [(12 * 4, 1), (8 * 4, 2)])
def test_kv_cached_blocks_equal_full_causal_recomputation(model, golden, infer_frames, clips):
    """Every block, at every step, equals recomputing the causal attention over all blocks of
    that step without a cache; two clips of 8 latent frames exercise the ring buffer (the
    window keeps the latest 8 frames) and a shorter last block (3 + 3 + 2)."""
    ref, motion = golden["ref"][None], golden["motion"][None]
    dit = CausalDiT(model)
    recorder = Recorder(dit)
    settings = SamplerSettings(infer_frames=infer_frames, sample_steps=2, seed=3, sink_distance=(4, 4))
    sampler = CausalSampler(dit, settings)
    sampler.start(ref, motion, golden["context"])
    audio = torch.randn(1, 25, 32, infer_frames * clips, generator=torch.Generator().manual_seed(0))
    for clip in range(clips):
        clip_audio = audio[..., clip * infer_frames : (clip + 1) * infer_frames]
        for _ in sampler.generate_clip(clip, clip_audio):
            pass
    worst = 0.0
    for step in range(settings.sample_steps):
        step_calls = [c for i, c in enumerate(recorder.calls) if i % settings.sample_steps == step]
        for upto in range(1, len(step_calls) + 1):
            expected = recompute_without_cache(model, step_calls[:upto], settings.latent_frames, ref, motion)
            worst = max(worst, relative_error(step_calls[upto - 1]["out"], expected))
    print(f"\nKV-cached vs recomputed ({clips} clip(s) of {infer_frames} frames): worst relative error {worst:.3e}")
    assert worst <= TOLERANCE


def run_clips(
    model, golden, clips=2, kv_cache="device", sink_in_place=True, kv_fp8=False, sampler_out=None, **overrides
):
    settings = SamplerSettings(**{"infer_frames": 12, "sample_steps": 2, "seed": 7} | overrides)
    sampler = CausalSampler(CausalDiT(model, sink_in_place=sink_in_place, kv_fp8=kv_fp8), settings, kv_cache=kv_cache)
    if sampler_out is not None:
        sampler_out.append(sampler)
    negative = golden["context"].flip(0) if settings.guide_scale > 0 else None
    sampler.start(golden["ref"][None], golden["motion"][None], golden["context"], negative)
    frames = settings.infer_frames
    audio = torch.randn(1, 25, 32, frames * clips, generator=torch.Generator().manual_seed(1))
    out = []
    for clip in range(clips):
        out += [x for _, x in sampler.generate_clip(clip, audio[..., clip * frames : (clip + 1) * frames])]
    return torch.cat(out, dim=2)


@pytest.mark.slow
def test_same_seed_same_video_other_seed_other_video(model, golden):
    a, b = run_clips(model, golden), run_clips(model, golden)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run_clips(model, golden, seed=8))


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
@pytest.mark.slow
def test_solvers_and_guidance_produce_finite_distinct_latents(model, golden, solver):
    plain = run_clips(model, golden, sample_solver=solver)
    guided = run_clips(model, golden, sample_solver=solver, guide_scale=5.0)
    assert torch.isfinite(plain).all() and torch.isfinite(guided).all()
    assert relative_error(guided, plain) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(infer_frames=32, sample_steps=3), dict(infer_frames=24, guide_scale=4.0)])
def test_caches_in_host_memory_give_the_same_video(model, golden, overrides):
    """The low-VRAM mode moves the KV caches, not the numbers: three clips (the ring wraps,
    a short last block, several steps; or two guidance branches) match the device caches."""
    on_device = run_clips(model, golden, clips=3, sink_in_place=False, **overrides)
    in_host_memory = run_clips(model, golden, clips=3, kv_cache="host", **overrides)
    assert torch.equal(in_host_memory, on_device)


@pytest.mark.parametrize("overrides", [dict(infer_frames=32, sample_steps=3), dict(infer_frames=24, guide_scale=4.0)])
@pytest.mark.slow
def test_sink_read_in_place_gives_the_same_video_as_concatenation(model, golden, overrides):
    """[sink | ring] read as one slice attends to the same keys as ring + sink concatenated,
    in another order: three clips (the ring wraps, a short last block, several steps; or two
    guidance branches) agree to float32 rounding."""
    concatenated = run_clips(model, golden, clips=3, sink_in_place=False, **overrides)
    in_place = run_clips(model, golden, clips=3, **overrides)
    error = relative_error(in_place, concatenated)
    print(f"\nsink in place vs concatenated: relative difference {error:.2e}")
    assert error <= TOLERANCE


def test_fp8_caches_stay_close_and_take_half_the_bytes(model, golden):
    """e4m3 keys and values (a scale per token and head) over three clips, the ring wrapping:
    close to the full-precision caches, whichever way the sink is read, at about half the
    bytes of bf16 caches."""
    overrides = dict(infer_frames=32, sample_steps=3)
    full = run_clips(model, golden, clips=3, **overrides)
    samplers = []
    fp8_in_place = run_clips(model, golden, clips=3, kv_fp8=True, sampler_out=samplers, **overrides)
    fp8_concatenated = run_clips(model, golden, clips=3, kv_fp8=True, sink_in_place=False, **overrides)
    error = relative_error(fp8_in_place, full)
    print(f"\nfp8 vs full-precision caches after 3 clips: relative difference {error:.2e}")
    assert 0 < error < 0.03
    assert relative_error(fp8_concatenated, fp8_in_place) <= TOLERANCE

    branch = samplers[0]._branches[0]
    cache, sink = branch.caches[0], branch.sink
    assert cache.keys[0].dtype == sink.raw_keys[0].dtype == torch.float8_e4m3fn
    cached = [t for ring in (cache.keys, cache.values, cache.key_scales, cache.value_scales) for t in ring]
    bf16_bytes = 2 * sum(k.numel() for k in cache.keys + cache.values)
    assert sum(t.nbytes for t in cached) <= 0.55 * bf16_bytes


@pytest.mark.slow
def test_fp8_caches_read_by_fp8_attention_stay_close_to_full_precision(model, golden, monkeypatch):
    """Three clips of the tiny DiT through the streaming sampler (the ring wraps), e4m3 caches
    read by fp8 attention: within 1% of full-precision caches and attention, and the attention
    reads the caches' own e4m3 buffers (no dequantised copy)."""
    overrides = dict(infer_frames=32, sample_steps=3)
    full = run_clips(model, golden, clips=3, **overrides)
    read = []
    emulated = dispatch.emulated_attention

    def recording(q, k, v):
        read.append(k.data.untyped_storage().data_ptr())
        return emulated(q, k, v)

    monkeypatch.setattr(dispatch, "emulated_attention", recording)
    monkeypatch.setattr(model, "kernels", dataclasses.replace(model.kernels, attention="fp8-emulated"))
    samplers = []
    fp8 = run_clips(model, golden, clips=3, kv_fp8=True, sampler_out=samplers, **overrides)
    error = relative_error(fp8, full)
    print(f"\nfp8 caches + fp8 attention vs full precision after 3 clips: relative difference {error:.2e}")
    assert 0 < error < 0.01

    caches = samplers[0]._branches[0].caches
    assert all(isinstance(cache, Fp8HeadKVCache) for cache in caches)
    buffers = {joint[0].untyped_storage().data_ptr() for cache in caches for joint in cache._joint}
    assert buffers <= set(read)


def test_fp8_caches_are_off_by_default(model, golden):
    samplers = []
    run_clips(model, golden, clips=1, sampler_out=samplers)
    assert samplers[0]._branches[0].caches[0].keys[0].dtype == torch.float32


def test_unknown_cache_place_is_refused(model):
    with pytest.raises(InputError, match="kv_cache must be one of device, host"):
        CausalSampler(CausalDiT(model), SamplerSettings(), kv_cache="disk")


def test_stop_check_ends_the_run_between_blocks(model, golden):
    sampler = CausalSampler(CausalDiT(model), SamplerSettings(infer_frames=24, sample_steps=1))
    sampler.start(golden["ref"][None], golden["motion"][None], golden["context"])
    finished = []
    with pytest.raises(GenerationCancelled):
        for start, _ in sampler.generate_clip(0, torch.zeros(1, 25, 32, 24), should_stop=lambda: len(finished) == 1):
            finished.append(start)
    assert finished == [0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(infer_frames=30), "multiple of 4"),
        (dict(sample_steps=0), "between 1 and 50"),
        (dict(sample_steps=51), "between 1 and 50"),
        (dict(sample_solver="heun"), "euler"),
        (dict(guide_scale=-1.0), ">= 0"),
    ],
)
def test_bad_settings_are_refused_before_any_compute(model, overrides, message):
    with pytest.raises(InputError, match=message):
        CausalSampler(CausalDiT(model), SamplerSettings(**overrides))


def test_block_split_of_preview_clip():
    assert SamplerSettings(infer_frames=32).blocks() == [(0, 3), (3, 3), (6, 2)]
    assert SamplerSettings(infer_frames=48).blocks() == [(0, 3), (3, 3), (6, 3), (9, 3)]
    assert np.isclose(SamplerSettings().latent_frames, 12)


def test_refilled_sink_keeps_its_storage_and_takes_the_new_values(model, golden):
    """Captured DiT calls read the sink by address, so a refill (the sink roll after clip 0)
    must land in the tensors already there, and the calls after it must see the new sink."""
    settings = SamplerSettings(infer_frames=12, sample_steps=1, seed=3)
    sampler = CausalSampler(CausalDiT(model), settings)
    sampler.start(golden["ref"][None], golden["motion"][None], golden["context"])
    sink = sampler._branches[0].sink
    before = [(k.data_ptr(), k.clone()) for k in sink.raw_keys]
    sampler.replace_sink(golden["ref"][None].flip(-1), golden["motion"][None])
    assert [k.data_ptr() for k in sink.raw_keys] == [ptr for ptr, _ in before]
    assert not torch.equal(sink.raw_keys[0], before[0][1])

    fresh = CausalSampler(CausalDiT(model), settings)
    fresh.start(golden["ref"][None].flip(-1), golden["motion"][None], golden["context"])
    for a, b in zip(sink.raw_keys, fresh._branches[0].sink.raw_keys, strict=True):
        assert torch.equal(a, b)
