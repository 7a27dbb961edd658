"""The streaming pipeline against golden outputs of the official LiveAvatar code itself.

The goldens (`tests/fixtures/official_stream/`, see its README) were made by running the
official pipelines unchanged on a tiny random checkpoint on a CPU in float32: the multi-GPU
streaming path (`causal_s2v_pipeline_tpp.py`, 4 DiT ranks + 1 VAE rank) and the single-GPU
path (`causal_s2v_pipeline.py`) with and without online decode (our `sink_roll`). They hold
the inputs, every random draw, every block's latents and every clip's decoded frames.

Here the same tiny DiT + LoRA and VAE go through the project's own loaders; the recorded
noise and sink distances go in through the two test seams (`CausalSampler.clip_noise`,
`streaming.sampler.sink_distance`); everything else (reference and motion encodes, sink
refills, decode) is the project's. Every block's latents and every clip's frames must match.
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, OFFICIAL_TINY, relative_error
from liveavatar_core.errors import InputError
from liveavatar_core.model_files import Precision
from liveavatar_core.models import load_dit_as
from liveavatar_core.pipeline import StreamingPipeline
from liveavatar_core.run_spec import RunSpec
from liveavatar_core.semantics import VideoSemantics
from liveavatar_core.streaming import CausalDiT
from liveavatar_core.streaming import sampler as sampler_module
from liveavatar_core.streaming.sampler import CausalSampler, SamplerSettings
from liveavatar_core.vae import load_vae

GOLDENS = FIXTURES / "official_stream"
LATENT_TOLERANCE = 1e-6
FRAME_TOLERANCE = 1e-4
CASES = {
    "multi_gpu": VideoSemantics("official-multi-gpu"),
    "single_gpu_online": VideoSemantics("official-single-gpu", sink_roll=True),
    "single_gpu_offline": VideoSemantics("official-single-gpu", sink_roll=False),
}


def load_golden(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(GOLDENS / f"{name}.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["json"])
        return meta, {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_models():
    files = types.SimpleNamespace(
        dit=OFFICIAL_TINY / "Wan2.2-S2V-tiny", lora=OFFICIAL_TINY / "liveavatar-tiny.safetensors", lora_strength=1.0
    )
    dit = load_dit_as(files, torch.device("cpu"), Precision(torch.float32))
    vae = load_vae(GOLDENS / "vae_tiny_wan21_dim8.safetensors", device="cpu", dtype=torch.float32)
    return dit, vae


def run_with_official_draws(monkeypatch, dit, vae, meta, golden, semantics):
    """Runs `StreamingPipeline.stream` on the golden's inputs with its noise and sink
    distances; returns (block latents by (clip, block), frames by clip [3, N, H, W] in -1..1)."""
    height, width = meta["size_hw"]
    distances = {(c["clip"], c["block"], c["step"]): c["d"] for c in meta["dit_calls"]}
    monkeypatch.setattr(
        CausalSampler, "clip_noise", lambda self, clip: golden[f"inputs/noise_clip{clip}"][None].clone()
    )
    monkeypatch.setattr(
        sampler_module, "sink_distance", lambda seed, clip, block, step, bounds=None: distances[(clip, block, step)]
    )
    latents = {}
    real_denoise = CausalSampler.denoise

    def recording_denoise(self, clip, block, *args, **kwargs):
        x = real_denoise(self, clip, block, *args, **kwargs)
        latents[(clip, block)] = x[0].clone()
        return x

    monkeypatch.setattr(CausalSampler, "denoise", recording_denoise)
    settings = SamplerSettings(sample_steps=meta["sample_steps"], infer_frames=meta["infer_frames"], seed=meta["seed"])
    image = golden["inputs/ref_image_uint8"].float() / 255.0
    pipeline = StreamingPipeline(dit, vae, "cpu", overlap_decode=False)
    frames: dict[int, list[torch.Tensor]] = {}
    spec = RunSpec.make(
        image,
        golden["inputs/audio_emb"],
        golden["inputs/context"],
        (width, height),
        settings,
        num_clip=meta["clips"],
        trim_to_audio=False,
        semantics=semantics,
    )
    for chunk in pipeline.stream(spec):
        frames.setdefault(chunk.clip, []).append(chunk.frames)
    video = {clip: (torch.cat(parts) * 2 - 1).permute(3, 0, 1, 2) for clip, parts in frames.items()}
    return latents, video


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_streaming_video_equals_the_official_pipeline(monkeypatch, tiny_models, name):
    meta, golden = load_golden(name)
    latents, video = run_with_official_draws(monkeypatch, *tiny_models, meta, golden, CASES[name])

    block_errors = {
        (clip, block): relative_error(latents[(clip, block)], golden[f"latents/clip{clip}_block{block}"])
        for clip in range(meta["clips"])
        for block in range(meta["blocks_per_clip"])
    }
    frame_counts = [video[clip].shape[1] for clip in range(meta["clips"])]
    frame_errors = [relative_error(video[clip], golden[f"video/clip{clip}"]) for clip in range(meta["clips"])]
    print(name, "block latents rel. error:", {k: f"{v:.2e}" for k, v in block_errors.items()})
    print(name, "clip frames rel. error:", [f"{e:.2e}" for e in frame_errors])
    assert set(latents) == set(block_errors), "the run computed other blocks than the official one"
    assert max(block_errors.values()) <= LATENT_TOLERANCE, block_errors
    assert frame_counts == meta["frames_per_clip"]
    assert max(frame_errors) <= FRAME_TOLERANCE, frame_errors


@pytest.mark.parametrize("noise", ["cpu", "official"])
def test_a_seed_draws_the_official_clip_noise(tiny_models, noise):
    """On a CPU in float32 both noise sources draw what the official code drew for the seed;
    `official` draws in the model's dtype on its device (bfloat16 on GPUs)."""
    meta, golden = load_golden("multi_gpu")
    dit, _ = tiny_models
    sampler = CausalSampler(
        CausalDiT(dit), SamplerSettings(infer_frames=meta["infer_frames"], seed=meta["seed"], noise=noise)
    )
    sampler._latent_hw = tuple(meta["latent_hw"])
    for clip in range(meta["clips"]):
        assert torch.equal(sampler.clip_noise(clip)[0], golden[f"inputs/noise_clip{clip}"])


def test_official_noise_follows_the_model_dtype(tiny_models):
    dit, _ = tiny_models
    half = CausalDiT(copy.deepcopy(dit).to(torch.bfloat16))
    sampler = CausalSampler(half, SamplerSettings(infer_frames=24, seed=3, noise="official"))
    sampler._latent_hw = (8, 8)
    expected = torch.randn(16, 6, 8, 8, generator=torch.Generator().manual_seed(3 + 1), dtype=torch.bfloat16)
    assert torch.equal(sampler.clip_noise(1)[0], expected.float())
    sampler = CausalSampler(half, SamplerSettings(infer_frames=24, seed=3, noise="cpu"))
    sampler._latent_hw = (8, 8)
    assert not torch.equal(sampler.clip_noise(1)[0], expected.float())  # cpu noise stays float32


@pytest.mark.parametrize("semantics", ["official", VideoSemantics("official-single-gpu", sink_roll="yes")])
def test_unknown_semantics_are_refused_before_any_compute(tiny_models, semantics):
    dit, vae = tiny_models
    with pytest.raises(InputError, match="semantics must be one of|sink_roll must be"):
        spec = RunSpec.make(
            torch.rand(64, 64, 3),
            torch.zeros(1, 25, 32, 24),
            torch.zeros(7, 64),
            (64, 64),
            SamplerSettings(infer_frames=24),
            semantics=semantics,
        )
        next(StreamingPipeline(dit, vae).stream(spec))
