"""The VAE's run options (`vae_kernels.VAEKernels`): each exact option gives the very frames of
the plain path through the streaming decoder, each approximate one stays within its stated error.

Compiling is checked with the `eager` backend (Dynamo's tracing of the per-frame calls and
their cache lists, without code generation: inductor takes minutes on a CPU); inductor's own
rounding on GPUs is reported by `tests/benchmarks/gpu_speed.py --parts vae`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLWan
from test_vae import random_latents, random_video, randomize

from liveavatar_core.vae import WanVAE
from liveavatar_core.vae_kernels import VAEKernels

TINY_DIM = 8  # the real VAE's structure with 12x fewer channels: cheap to trace
PLAIN = VAEKernels(autotune=False, channels_last=False, autocast=False, compile=False)
COMPILED = dataclasses.replace(PLAIN, compile=True, compile_backend="eager")
# bf16 decode of float32 weights on the tiny random VAE (pixels in [-1, 1]): measured max
# 0.082, mean 0.0064; real weights and sizes are reported by the benchmark.
BF16_MAX_ERROR, BF16_MEAN_ERROR = 0.15, 0.01


@pytest.fixture(scope="module")
def weights() -> AutoencoderKLWan:
    return randomize(AutoencoderKLWan(base_dim=TINY_DIM)).requires_grad_(False)


def vae_with(weights: AutoencoderKLWan, kernels: VAEKernels) -> WanVAE:
    return WanVAE(weights, kernels=kernels)


def stream(vae: WanVAE, latents: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    """Frames of each chunk, decoded by one streaming decoder."""
    out, start = [], 0
    with vae.streaming_decoder() as decoder:
        for size in chunks:
            out.append(decoder.decode_next(latents[:, :, start : start + size]))
            start += size
    return out


@pytest.fixture(scope="module")
def compiled(weights) -> WanVAE:
    return vae_with(weights, COMPILED)


@pytest.mark.slow
def test_compiled_streaming_decode_gives_the_plain_frames(weights, compiled):
    # The official multi-GPU order: a priming run of motion latents, then blocks of 3.
    latents = random_latents(2 + 3 + 3 + 3, 4, 6)
    chunks = [2, 3, 3, 3]
    plain = stream(vae_with(weights, PLAIN), latents, chunks)
    for _ in range(2):  # a second video reuses the compiled calls with fresh caches
        fast = stream(compiled, latents, chunks)
        for a, b in zip(fast, plain, strict=True):
            assert torch.equal(a, b)
    # Whole-video decode goes through the same compiled per-frame call.
    assert torch.equal(compiled.decode(latents), torch.cat(plain, dim=2))


@pytest.mark.slow
def test_compiled_decoder_primed_as_a_resume_gives_the_plain_frames(weights, compiled):
    # A resumed run primes a fresh decoder with the last `decoder_memory()` latents.
    memory = compiled.decoder_memory()
    latents = random_latents(memory + 3, 4, 6, seed=5)
    plain = stream(vae_with(weights, PLAIN), latents, [memory, 3])
    fast = stream(compiled, latents, [memory, 3])
    assert torch.equal(fast[1], plain[1])


@pytest.mark.slow
def test_compiled_encode_gives_the_plain_latents(weights, compiled):
    plain = vae_with(weights, PLAIN)
    for frames in (1, 9, 13):  # the reference image alone; another length reuses the compiled chunks
        video = random_video(frames, 32, 48)
        assert torch.equal(compiled.encode(video), plain.encode(video))


def test_bf16_decode_of_float32_weights_is_within_its_stated_error(weights):
    latents = random_latents(5, 4, 6)
    exact = vae_with(weights, PLAIN).decode(latents)
    bf16 = vae_with(weights, dataclasses.replace(PLAIN, autocast=True))
    whole = bf16.decode(latents)
    error = (whole - exact).abs()
    print(f"\nbf16 decode vs float32: max {error.max():.4f}, mean {error.mean():.5f}")
    assert 0 < error.mean() <= BF16_MEAN_ERROR and error.max() <= BF16_MAX_ERROR
    # And streamed block by block it gives the frames of its own whole decode.
    assert torch.allclose(torch.cat(stream(bf16, latents, [2, 3]), dim=2), whole, atol=1e-2)


def test_default_precision_is_the_official_one():
    # Official LiveAvatar: bf16 weights under amp.autocast(bf16) on GPUs; float32 stays float32.
    kernels = VAEKernels(autocast=None)
    assert kernels.autocast_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    assert kernels.autocast_dtype(torch.device("cpu"), torch.float32) is None
    assert kernels.autocast_dtype(torch.device("cuda"), torch.float32) is None
    assert VAEKernels(autocast=False).autocast_dtype(torch.device("cuda"), torch.bfloat16) is None
    assert VAEKernels(autocast=True).autocast_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16


def test_options_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIVEAVATAR_VAE_COMPILE", "1")
    monkeypatch.setenv("LIVEAVATAR_VAE_AUTOCAST", "0")
    monkeypatch.setenv("LIVEAVATAR_VAE_CHANNELS_LAST", "0")
    kernels = VAEKernels()
    assert kernels.compile and kernels.autocast is False and not kernels.channels_last and kernels.autotune
    monkeypatch.delenv("LIVEAVATAR_VAE_COMPILE")
    monkeypatch.delenv("LIVEAVATAR_VAE_AUTOCAST")
    assert not VAEKernels().compile and VAEKernels().autocast is None


def test_each_vae_keeps_its_own_options(weights):
    # Options belong to the VAE, not the process: one compiled, one plain, side by side.
    a, b = vae_with(weights, COMPILED), vae_with(weights, PLAIN)
    assert a.network_call("decoder") is not weights.decoder
    assert b.network_call("decoder") is weights.decoder
