"""The sampler's `gpus` option under the nodes: a `VideoJob` with gpus > 1 runs in the shared
warm worker pool (CPU processes with gloo here) and gives exactly the frames and progress of
gpus = 1 on the embedded default model; Cancel keeps the earlier frames in the mp4; the pool
is reused, replaced and ended as the settings change; too many GPUs are refused up front.

Torch runs on one thread on both sides: equality is bit for bit (see test_parallel.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from liveavatar_core.errors import InputError
from liveavatar_core.generation import EncodedAudio, PromptEmbeddings, make_job, render, worker_model_files
from liveavatar_core.parallel.shared_pools import release_shared_pool, shared_pool
from liveavatar_core.streaming import GenerationCancelled, SamplerSettings
from liveavatar_core.video_writer import read_video_info

# 3 steps on 2 processes (2 + 1 and the decode); 40 frames of audio at 16 frames per clip: 3
# clips, the sink roll crossed, the video cut inside the last clip.
SETTINGS = SamplerSettings(sample_steps=3, infer_frames=16, seed=7)
AUDIO_FRAMES = 40


@pytest.fixture(scope="module")
def models(default_models):
    yield default_models
    release_shared_pool()


@pytest.fixture(autouse=True)
def one_thread():
    """Also what the shared pool gives each CPU worker (this process's threads shared out)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def video_job(models, gpus: int, num_clip: int | None = None):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 3, 64, AUDIO_FRAMES, generator=generator).bfloat16()
    audio = EncodedAudio(features, torch.rand(1, AUDIO_FRAMES * 640, generator=generator) - 0.5, 16000)
    prompt = PromptEmbeddings(torch.randn(5, 48, generator=generator), torch.randn(3, 48, generator=generator))
    image = torch.rand(96, 128, 3, generator=generator)
    return make_job(models, image, audio, prompt, "64*64", SETTINGS, num_clip=num_clip, gpus=gpus)


@pytest.fixture(scope="module")
def reference(models):
    """The gpus = 1 run: its chunks and its progress calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = []
        chunks = list(video_job(models, 1).frames(progress=steps.append))
    finally:
        torch.set_num_threads(threads)
    return chunks, steps


def assert_same(chunks, expected):
    assert [(c.clip, c.block, c.ends_clip) for c in chunks] == [(c.clip, c.block, c.ends_clip) for c in expected]
    for got, want in zip(chunks, expected):
        assert torch.equal(got.frames, want.frames), f"clip {got.clip} block {got.block} differs"


@pytest.mark.slow
def test_two_gpus_give_the_frames_and_progress_of_one_and_stay_warm(models, reference):
    expected, expected_steps = reference
    job = video_job(models, 2)
    steps = []
    assert_same(list(job.frames(progress=steps.append)), expected)
    assert steps == expected_steps and len(steps) == job.total_steps  # the progress bar ends full
    pool = shared_pool(worker_model_files(models), 2, "cpu")
    assert pool.running and len(pool.pids) == 2
    workers = pool.pids
    assert_same(list(video_job(models, 2).frames()), expected)
    assert pool.pids == workers, "the next run started new workers"


@pytest.mark.slow
def test_cancel_keeps_the_earlier_frames_in_the_mp4(models, reference, tmp_path):
    expected, _ = reference
    seen = []
    with pytest.raises(GenerationCancelled):
        render(
            video_job(models, 2),
            tmp_path / "stopped.mp4",
            keep_frames=False,
            should_stop=lambda: len(seen) >= 1,
            on_frames=seen.append,
        )
    assert 1 <= len(seen) < len(expected)  # blocks already in the pipeline still arrive
    for got, want in zip(seen, expected):
        assert torch.equal(got, want.frames)
    assert read_video_info(tmp_path / "stopped.mp4")["frames"] == sum(f.shape[0] for f in seen)
    assert shared_pool(worker_model_files(models), 2, "cpu").running, "Cancel must not end the workers"


@pytest.mark.slow
def test_another_count_replaces_the_pool_and_one_gpu_ends_it(models, reference):
    expected, _ = reference
    two = shared_pool(worker_model_files(models), 2, "cpu")
    first_clip = [c for c in expected if c.clip == 0]
    assert_same(list(video_job(models, 3, num_clip=1).frames()), first_clip)  # one step per process
    three = shared_pool(worker_model_files(models), 3, "cpu")
    assert three is not two and not two.running and len(three.pids) == 3
    assert_same(list(video_job(models, 1, num_clip=1).frames()), first_clip)
    assert not three.running, "a run in this process must free the GPUs of the workers"


def test_gpu_count_is_checked_when_the_job_is_made(models, monkeypatch):
    on_gpus = dataclasses.replace(models, device=torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(InputError, match=r"gpus = 3, but 2 CUDA GPUs are visible: set gpus to at most 2"):
        video_job(on_gpus, 3)
    assert video_job(on_gpus, 2).gpus == 2  # enough GPUs: accepted (nothing runs yet)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(InputError, match=r"0 CUDA GPUs are visible \(CUDA_VISIBLE_DEVICES=\)"):
        video_job(on_gpus, 2)


def test_other_bad_gpu_counts_are_refused(models):
    with pytest.raises(InputError, match="gpus must be at least 1"):
        video_job(models, 0)
    with pytest.raises(InputError, match="not loaded from files"):
        video_job(dataclasses.replace(models, files=None), 2)
    with pytest.raises(InputError, match="needs CUDA GPUs"):
        video_job(dataclasses.replace(models, device=torch.device("mps")), 2)


@pytest.mark.slow
def test_workers_do_not_run_the_host_applications_main_script(models, tmp_path):
    """A host's main script (ComfyUI's main.py) runs again in every spawned worker unless
    hidden: here each run of the script leaves a mark; only the host's own may."""
    script = tmp_path / "host.py"
    script.write_text(
        "import os, sys\n"
        "open(os.path.join(sys.argv[1], f'ran-{os.getpid()}'), 'w').close()\n"
        "if __name__ == '__main__':\n"
        "    from liveavatar_core.model_files import ModelFiles\n"
        "    from liveavatar_core.parallel import FileModels\n"
        "    from liveavatar_core.parallel.shared_pools import shared_pool\n"
        "    pool = shared_pool(FileModels(ModelFiles(dit=sys.argv[2], vae=sys.argv[3])), 2, 'cpu')\n"
        "    pool.start()\n"
        "    print('workers', len(pool.pids))\n"
    )
    files = worker_model_files(models).files
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(files.dit), str(files.vae)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workers 2" in result.stdout
    assert len(list(tmp_path.glob("ran-*"))) == 1
