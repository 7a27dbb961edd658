"""Pipeline parallelism over processes (CPU, gloo): 2, 3 and 5 ranks make exactly the frames
one process makes, across the sink roll, with guidance and both solvers; stopping, a killed
rank, and the errors a user can act on.

Both sides run torch on one thread: CPU kernels may split reductions differently with another
thread count, and equality here is bit for bit (torch.equal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from conftest import OFFICIAL_TINY, ROOT, relative_error
from liveavatar_core.dit import load_dit
from liveavatar_core.errors import CheckpointError, DistributedError, InputError
from liveavatar_core.parallel import WorkerPool, plan_stages
from liveavatar_core.pipeline import StreamingPipeline
from liveavatar_core.run_spec import RunSpec
from liveavatar_core.semantics import VideoSemantics
from liveavatar_core.streaming import GenerationCancelled, SamplerSettings
from liveavatar_core.streaming.sampler import sink_distance
from liveavatar_core.vae import WanVAE

SIZE = "64*64"  # the smallest size the tiny DiT's motion packer takes
INFER = 16


@dataclass(frozen=True)
class TinyModels:
    """What every worker builds for itself: the tiny DiT from its files, a small VAE from a seed."""

    def load_dit(self, device):
        return load_dit(OFFICIAL_TINY / "Wan2.2-S2V-tiny", device=device, dtype=torch.float32)

    def load_vae(self, device):
        torch.manual_seed(0)
        return WanVAE(AutoencoderKLWan(base_dim=8).eval().requires_grad_(False).to(device))


MULTI_GPU, SINGLE_GPU = VideoSemantics("official-multi-gpu"), VideoSemantics("official-single-gpu")
CASES = {
    # 2 clips: the sink roll is crossed; two branches; dpmpp_2m history travels between ranks.
    "guided_dpmpp": (
        SamplerSettings(sample_steps=2, infer_frames=INFER, sample_solver="dpmpp_2m", guide_scale=5.0, seed=11),
        32,
        MULTI_GPU,
    ),
    # 3 clips, the video cut inside clip 2 (40 frames of audio); 3 steps on 2 ranks.
    "euler_3_steps": (SamplerSettings(sample_steps=3, infer_frames=INFER, seed=12), 40, MULTI_GPU),
    # The official multi-GPU layout: 4 euler steps, 3 clips.
    "official_4_steps": (SamplerSettings(sample_steps=4, infer_frames=INFER, seed=13), 48, MULTI_GPU),
    # The single-GPU semantics over processes: motion windows re-encoded on the decoding rank.
    "single_gpu": (SamplerSettings(sample_steps=2, infer_frames=INFER, seed=14), 40, SINGLE_GPU),
}


def make_job(case: str, **overrides) -> RunSpec:
    settings, audio_frames, semantics = CASES[case]
    context = load_file(str(OFFICIAL_TINY / "golden.safetensors"))["context"]
    negative = context.flip(0) if settings.guide_scale > 0 else None
    image = torch.rand(120, 90, 3, generator=torch.Generator().manual_seed(5))
    features = torch.randn(1, 25, 32, audio_frames, generator=torch.Generator().manual_seed(6))
    inputs = {
        "image": image,
        "audio_features": features,
        "context": context,
        "size": SIZE,
        "settings": settings,
        "negative_context": negative,
        "semantics": semantics,
    }
    return RunSpec.make(**(inputs | overrides))


@pytest.fixture(scope="module")
def reference():
    """The single-process frames of each case, computed once."""
    models, done = TinyModels(), {}

    def frames(case: str):
        if case not in done:
            job = make_job(case)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                pipeline = StreamingPipeline(models.load_dit("cpu"), models.load_vae("cpu"))
                done[case] = list(pipeline.stream(job))
            finally:
                torch.set_num_threads(threads)
        return done[case]

    return frames


def make_pool(world_size: int):
    pool = WorkerPool(world_size, TinyModels(), device="cpu", cpu_threads=1)
    pool.start()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def pool2():
    yield from make_pool(2)


@pytest.fixture(scope="module")
def pool3():
    yield from make_pool(3)


def assert_same(chunks, expected):
    assert [(c.clip, c.block, c.ends_clip) for c in chunks] == [(c.clip, c.block, c.ends_clip) for c in expected]
    for got, want in zip(chunks, expected):
        assert torch.equal(got.frames, want.frames), f"clip {got.clip} block {got.block} differs"


# -- the plan -------------------------------------------------------------------------------------
def test_rank_roles_for_every_shape_of_pipeline():
    official = plan_stages(5, 4)
    assert [(s.rank, list(s.steps), s.decodes) for s in official.stages] == [
        (0, [0], False),
        (1, [1], False),
        (2, [2], False),
        (3, [3], False),
        (4, [], True),
    ]
    fewer = plan_stages(2, 5)  # longer runs first; the decoding rank gets the shorter one
    assert [(list(s.steps), s.decodes) for s in fewer.stages] == [([0, 1, 2], False), ([3, 4], True)]
    idle = plan_stages(5, 2)
    assert [s.rank for s in idle.stages] == [0, 1, 4] and idle.stage(2) is None and idle.stage(3) is None
    assert idle.neighbours(1) == (0, 4) and idle.decoder == 4 and idle.step_ranks == [0, 1]
    single = plan_stages(1, 3)
    assert [(list(s.steps), s.decodes) for s in single.stages] == [([0, 1, 2], True)]


def test_sink_distance_depends_only_on_the_calls_place():
    draws = [sink_distance(7, clip, block, step) for clip in range(4) for block in range(4) for step in range(4)]
    assert draws == [
        sink_distance(7, clip, block, step) for clip in range(4) for block in range(4) for step in range(4)
    ]
    assert all(4 <= d <= 30 for d in draws) and len(set(draws)) > 10
    assert draws != [
        sink_distance(8, clip, block, step) for clip in range(4) for block in range(4) for step in range(4)
    ]


@pytest.mark.slow
def test_block_plan_matches_where_one_process_stops(reference):
    for case in CASES:
        job = make_job(case)
        assert job.schedule.blocks() == [(c.clip, c.block) for c in reference(case)]


# -- equality with one process ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_run_three_steps_and_cut_the_video_inside_a_clip(pool2, reference):
    """Rank 0 runs steps 0-1, rank 1 step 2 and the decode; 3 clips, cut in the third."""
    assert_same(list(pool2.run(make_job("euler_3_steps"))), reference("euler_3_steps"))


@pytest.mark.slow
def test_ranks_with_their_caches_in_host_memory_give_the_same_frames(pool2, reference):
    # Device caches read the sink in place, host caches concatenate it: equal to float32 rounding.
    chunks, expected = list(pool2.run(make_job("euler_3_steps", kv_cache="host"))), reference("euler_3_steps")
    assert [(c.clip, c.block, c.ends_clip) for c in chunks] == [(c.clip, c.block, c.ends_clip) for c in expected]
    for got, want in zip(chunks, expected):
        assert relative_error(got.frames, want.frames) < 1e-5, f"clip {got.clip} block {got.block} differs"


@pytest.mark.slow
def test_two_ranks_with_guidance_and_dpmpp(pool2, reference):
    assert_same(list(pool2.run(make_job("guided_dpmpp"))), reference("guided_dpmpp"))


@pytest.mark.slow
def test_two_ranks_give_the_official_multi_gpu_video_of_one_process(pool2, reference):
    assert_same(list(pool2.run(make_job("official_4_steps"))), reference("official_4_steps"))


@pytest.mark.slow
def test_two_ranks_give_the_official_single_gpu_video_of_one_process(pool2, reference):
    """The decoding rank re-encodes the motion window and sends the rolled sink to rank 0."""
    assert_same(list(pool2.run(make_job("single_gpu"))), reference("single_gpu"))


@pytest.mark.slow
def test_three_ranks_one_step_each_and_a_decoding_rank(pool3, reference):
    assert_same(list(pool3.run(make_job("guided_dpmpp"))), reference("guided_dpmpp"))


@pytest.mark.slow
def test_five_ranks_for_two_steps_leave_two_idle_and_five_for_four_steps_are_the_official_layout(reference):
    for pool in make_pool(5):
        assert_same(list(pool.run(make_job("guided_dpmpp"))), reference("guided_dpmpp"))
        assert_same(list(pool.run(make_job("official_4_steps"))), reference("official_4_steps"))


# -- stopping and failures ----------------------------------------------------------------------------
@pytest.mark.slow
def test_stop_keeps_the_frames_before_it_and_the_pool_stays_warm(pool2, reference):
    expected = reference("euler_3_steps")
    seen = []
    with pytest.raises(GenerationCancelled):
        for chunk in pool2.run(make_job("euler_3_steps"), should_stop=lambda: len(seen) >= 1):
            seen.append(chunk)
    assert 1 <= len(seen) < len(expected)  # blocks already in the pipeline still arrive
    assert_same(seen, expected[: len(seen)])
    # The same workers take the next run; clip 0 does not depend on later clips.
    first_clip = list(pool2.run(make_job("euler_3_steps", num_clip=1)))
    assert_same(first_clip, [c for c in expected if c.clip == 0])


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_and_is_named(pool3, reference):
    expected = reference("guided_dpmpp")
    seen = []
    with pytest.raises(DistributedError, match=r"rank 1 died \(killed by SIGKILL\) during the run") as failure:
        for chunk in pool3.run(make_job("guided_dpmpp")):
            seen.append(chunk)
            if len(seen) == 1:
                os.kill(pool3.pids[1], signal.SIGKILL)
    assert f"The {sum(c.frames.shape[0] for c in seen)} frames made before it were kept" in str(failure.value)
    assert_same(seen, expected[: len(seen)])
    assert not pool3.running


@dataclass(frozen=True)
class WrongVaeFile(TinyModels):
    def load_vae(self, device):
        raise CheckpointError("vae.safetensors holds a text encoder. Pick wan_2.1_vae.safetensors.")


@pytest.mark.slow
def test_a_rank_that_cannot_load_its_model_passes_the_error_on():
    pool = WorkerPool(2, WrongVaeFile(), device="cpu", cpu_threads=1)
    try:
        with pytest.raises(CheckpointError, match="holds a text encoder"):
            list(pool.run(make_job("euler_3_steps")))
        assert not pool.running
    finally:
        pool.shutdown()


def test_bad_jobs_are_refused_before_any_worker_starts():
    pool = WorkerPool(2, TinyModels(), device="cpu")
    with pytest.raises(InputError, match="multiple of 16"):
        pool.run(make_job("euler_3_steps", size="100*96"))
    with pytest.raises(InputError, match="negative prompt"):
        pool.run(make_job("guided_dpmpp", negative_context=None))
    with pytest.raises(InputError, match="reference image"):
        pool.run(make_job("euler_3_steps", image=torch.rand(3, 64, 64)))
    assert not pool.running and pool.pids == []


def test_more_processes_than_gpus_names_the_gpu_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(InputError, match="5 pipeline processes need 5 GPUs, but 3 are visible"):
        WorkerPool(5, TinyModels())


@pytest.mark.slow
def test_a_rank_that_cannot_join_says_which_settings_help():
    """Rank 0 of 2 waits for a rank 1 that never comes: the watchdog ends it with the hints."""
    code = (
        "import torch, torch.distributed as dist; from datetime import timedelta;"
        "from liveavatar_core.parallel.group import join;"
        "store = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60));"
        "join(0, 2, torch.device('cpu'), store, 2.0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 3
    assert "could not join the others within 2 s" in result.stderr
    assert "NCCL_P2P_DISABLE=1" in result.stderr and "MASTER_PORT" in result.stderr


# -- the torchrun command -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from liveavatar_core.video_writer import StreamingVideoWriter  # noqa: F401  (PyAV present)

    folder = tmp_path_factory.mktemp("cli")
    save_file(TinyModels().load_vae("cpu").model.state_dict(), folder / "vae.safetensors")
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=24,
        num_attention_heads=2,
        intermediate_size=48,
        conv_dim=(16,) * 7,
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=33,
    )
    Wav2Vec2ForCTC(config).eval().save_pretrained(folder / "wav2vec2")
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(folder / "wav2vec2")
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)).save(folder / "face.png")
    import soundfile

    t = np.arange(16000 * 2) / 16000  # 2 s: 49 frames of audio, so 2 clips of 16 frames with --num-clip 2
    soundfile.write(folder / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return folder


@pytest.mark.slow
def test_torchrun_command_writes_the_mp4_on_the_last_rank(cli_files):
    from liveavatar_core.video_writer import read_video_info

    out = cli_files / "avatar.mp4"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "liveavatar_core.parallel.run",
        "--dit",
        str(OFFICIAL_TINY / "Wan2.2-S2V-tiny"),
        "--vae",
        str(cli_files / "vae.safetensors"),
        "--audio-encoder",
        str(cli_files / "wav2vec2"),
        "--prompt-embedding",
        str(OFFICIAL_TINY / "golden.safetensors"),
        "--image",
        str(cli_files / "face.png"),
        "--audio",
        str(cli_files / "speech.wav"),
        "--size",
        SIZE,
        "--infer-frames",
        str(INFER),
        "--num-clip",
        "2",
        "--sample-steps",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--output",
        str(out),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {2 * INFER - 3} frames to {out}" in result.stdout
    info = read_video_info(out)
    assert (info["frames"], info["width"], info["height"]) == (2 * INFER - 3, 64, 64)
