"""Resume after a crash: a run killed with SIGKILL after clip 2 of 4 leaves a playable mp4 and
a sidecar; a resumed run appends the rest, and the file equals an uninterrupted run's frame
for frame, with the audio in sync. Changed inputs and damaged sidecars are refused before any
compute, naming what is wrong and the fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.generation import EncodedAudio, PromptEmbeddings, make_job, render
from liveavatar_core.resume import replay_clips, sidecar_path
from liveavatar_core.streaming import SamplerSettings
from liveavatar_core.video_writer import read_video_info
from nodes.decode import OnlineVAEDecode

ROOT = Path(__file__).resolve().parents[1]
CLIPS, KILLED_AFTER = 4, 2
SETTINGS = SamplerSettings(sample_steps=2, infer_frames=16)  # 4 latent frames per clip: blocks of 3 and 1
FRAMES = CLIPS * 16 - 3
NAME = "avatar_00001_"

# Runs a video in a child process and stops dead (SIGKILL from the test) once clip 2 of 4 is on
# disk, with the generation already inside clip 3.
CHILD = """
import json, sys, time, torch
from pathlib import Path
from liveavatar_core.generation import make_job, render
from liveavatar_core.models import ModelFiles, load_models
inputs = torch.load(sys.argv[1], weights_only=False)  # written by the test itself
mp4 = Path(sys.argv[2])
models = load_models(ModelFiles(**inputs["files"]), dtype="fp32")
job = make_job(models, inputs["image"], inputs["audio"], inputs["prompt"], "64*64", inputs["settings"])
def progress(p):
    if p.clip == __KILLED_AFTER__:
        sidecar = mp4.with_name(mp4.stem + ".resume.json")
        while not (sidecar.exists() and json.loads(sidecar.read_text())["clips_done"] == __KILLED_AFTER__):
            time.sleep(0.05)
        print("READY", flush=True)
        time.sleep(600)
render(job, mp4, keep_frames=False, progress=progress)
""".replace("__KILLED_AFTER__", str(KILLED_AFTER))


@pytest.fixture(scope="module")
def inputs(default_models, default_model_files):
    generator = torch.Generator().manual_seed(3)
    frames = CLIPS * 16
    # A tone, which AAC codes closely: a seam or a shift in time would show in the decoded waveform.
    tone = 0.3 * torch.sin(2 * torch.pi * 440 * torch.arange(frames * 16000 // 25) / 16000)
    audio = EncodedAudio(torch.randn(1, 3, 64, frames, generator=generator).bfloat16(), tone.repeat(2, 1), 16000)
    prompt = PromptEmbeddings(torch.randn(5, 48, generator=generator), torch.randn(3, 48, generator=generator))
    files = default_model_files
    return {
        "image": torch.rand(96, 128, 3, generator=generator),
        "audio": audio,
        "prompt": prompt,
        "settings": SETTINGS,
        "files": {
            "dit": files["diffusion_models"],
            "vae": files["vae"],
            "lora": files["loras"],
            "text_encoder": files["text_encoders"],
            "audio_encoder": files["audio_encoders"],
        },
    }


def job_of(models, inputs, **changes):
    arguments = dict(image=inputs["image"], audio=inputs["audio"], prompt=inputs["prompt"], settings=SETTINGS)
    arguments.update(changes)
    return make_job(models, size="64*64", **arguments)


@pytest.fixture(scope="module")
def killed(inputs, tmp_path_factory):
    """The folder of a run killed (SIGKILL) after clip 2 of 4: its mp4 and sidecar."""
    folder = tmp_path_factory.mktemp("killed")
    torch.save(inputs, folder / "inputs.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder / "inputs.pt"), str(folder / f"{NAME}.mp4")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (folder / "inputs.pt").unlink()
    return folder


@pytest.fixture(scope="module")
def uninterrupted(default_models, inputs, tmp_path_factory):
    mp4 = tmp_path_factory.mktemp("whole") / "whole.mp4"
    render(job_of(default_models, inputs), mp4, keep_frames=False)
    assert not sidecar_path(mp4).exists(), "a finished run leaves no resume state"
    return mp4


def copy_of(killed: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(killed, folder)
    return folder / f"{NAME}.mp4"


def decoded(mp4: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every video frame (RGB) and the audio samples, as a player decodes them."""
    with av.open(str(mp4)) as container:
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(mp4)) as container:
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return video, audio


def test_the_replay_window_covers_the_attention_reach():
    # 40 layers, 12 latent frames per clip, first block 3: the official DiT at 48 frames per clip
    assert replay_clips(40, 12, 3) == 37
    assert replay_clips(2, 4, 3) == 1  # the small model of these tests
    assert replay_clips(40, 1, 1) == 0  # one-frame clips attend to nothing before them


@pytest.mark.slow
def test_a_killed_run_leaves_a_playable_mp4_and_its_sidecar(killed):
    mp4 = killed / f"{NAME}.mp4"
    info = read_video_info(mp4)
    frames = KILLED_AFTER * 16 - 3
    assert info["frames"] == frames and abs(info["audio_duration_s"] - frames / 25) <= 1 / 25
    record = json.loads(sidecar_path(mp4).read_text())
    assert (record["clips_done"], record["frames"]) == (KILLED_AFTER, frames)


@pytest.mark.slow
def test_resume_appends_the_rest_and_equals_an_uninterrupted_run(
    default_models, inputs, killed, uninterrupted, tmp_path
):
    mp4 = copy_of(killed, tmp_path)
    result = render(job_of(default_models, inputs), mp4, keep_frames=False, resume=True)
    assert result.frames_written == FRAMES
    info = read_video_info(mp4)
    assert info["frames"] == FRAMES and abs(info["audio_duration_s"] - FRAMES / 25) <= 1 / 25
    video, audio = decoded(mp4)
    whole_video, whole_audio = decoded(uninterrupted)
    assert np.array_equal(video, whole_video), f"max difference {np.abs(video.astype(int) - whole_video).max()}"
    # The audio: the same samples at the same times. The resumed run's AAC encoder starts anew
    # (warmed up on the audio before the seam), so the decoded waveforms differ by coding noise
    # only: 1% of the tone's amplitude; one sample of shift would be 6%. The tone's abrupt end,
    # coded by two encoders, differs more.
    assert audio.shape == whole_audio.shape
    cut = FRAMES * 48000 // 25 - 2048
    assert np.abs(audio - whole_audio)[:, :cut].max() < 0.015
    assert np.abs(audio - whole_audio).max() < 0.1
    assert not list(mp4.parent.glob(f"{NAME}.resume*")), "the finished run left resume files"


@pytest.mark.slow
def test_without_the_replayed_clip_the_resumed_frames_differ(
    default_models, inputs, killed, uninterrupted, tmp_path, monkeypatch
):
    """The caches matter: resumed without repeating clip 1's DiT calls, clip 2 on differs."""
    import liveavatar_core.resume

    mp4 = copy_of(killed, tmp_path)
    monkeypatch.setattr(liveavatar_core.resume, "replay_clips", lambda *args: 0)
    render(job_of(default_models, inputs), mp4, keep_frames=False, resume=True)
    video, whole = decoded(mp4)[0], decoded(uninterrupted)[0]
    done = KILLED_AFTER * 16 - 3
    assert np.array_equal(video[:done], whole[:done])
    assert np.abs(video[done:].astype(int) - whole[done:]).max() > 10


@pytest.mark.slow
def test_resume_with_changed_inputs_names_them_before_any_compute(default_models, inputs, killed, tmp_path):
    mp4 = copy_of(killed, tmp_path)
    size = mp4.stat().st_size
    changed = job_of(
        default_models,
        inputs,
        settings=SamplerSettings(sample_steps=2, infer_frames=16, seed=7),
        image=inputs["image"].flip(0),
    )
    with pytest.raises(
        InputError, match=r"seed was 0, now 7.*the portrait changed|the portrait changed.*seed was 0"
    ) as error:
        render(changed, mp4, keep_frames=False, resume=True, should_stop=lambda: pytest.fail("it computed"))
    assert "turn resume off" in str(error.value)
    assert mp4.stat().st_size == size


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda mp4: sidecar_path(mp4).write_text("{"), "unreadable"),
        (lambda mp4: os.truncate(mp4, 1000), "fewer than"),
        (lambda mp4: next(mp4.parent.glob(f"{NAME}.resume-clip-*")).write_bytes(b"junk"), "unreadable"),
    ],
    ids=["json", "short-mp4", "state"],
)
def test_a_damaged_sidecar_is_refused_with_the_fix(default_models, inputs, killed, tmp_path, damage, message):
    mp4 = copy_of(killed, tmp_path)
    damage(mp4)
    with pytest.raises(InputError, match=f"damaged.*{message}.*delete it"):
        render(job_of(default_models, inputs), mp4, keep_frames=False, resume=True)


@pytest.mark.slow
def test_the_decode_node_continues_the_unfinished_mp4(default_models, inputs, killed, uninterrupted, tmp_path, comfyui):
    import folder_paths

    output = tmp_path / "output"
    shutil.copytree(killed, output / "LiveAvatar")
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(output))
    try:
        node = OnlineVAEDecode()
        with pytest.raises(InputError, match="frames"):
            node.decode(job_of(default_models, inputs), "mp4 + frames", "LiveAvatar/avatar", 19, resume=True)
        with pytest.raises(InputError, match="seed was 0, now 1"):
            node.decode(
                job_of(default_models, inputs, settings=SamplerSettings(sample_steps=2, infer_frames=16, seed=1)),
                "mp4",
                "LiveAvatar/avatar",
                19,
                resume=True,
            )
        result = node.decode(job_of(default_models, inputs), "mp4", "LiveAvatar/avatar", 19, resume=True)
    finally:
        folder_paths.set_output_directory(previous)
    mp4 = output / "LiveAvatar" / f"{NAME}.mp4"
    assert result["ui"]["images"][0]["filename"] == mp4.name
    assert result["result"][3] == str(mp4)
    assert result["result"][1]["waveform"].shape[-1] == round(FRAMES * 16000 / 25)
    assert np.array_equal(decoded(mp4)[0], decoded(uninterrupted)[0])
