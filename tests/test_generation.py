"""The job API under the nodes: size modes, input checks before any compute, and the audio
that goes with the rendered frames."""

from __future__ import annotations

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.generation import EncodedAudio, PromptEmbeddings, make_job, render
from liveavatar_core.sizing import area_fit_size
from liveavatar_core.streaming import SamplerSettings
from liveavatar_core.video_writer import read_video_info


@pytest.mark.parametrize("image_hw", [(640, 512), (512, 640), (1080, 1920), (300, 300), (2000, 500)])
@pytest.mark.parametrize("size", ["688*368", "704*384", "1280*720"])
def test_official_area_follows_the_image_within_the_budget(image_hw, size):
    width, height = (int(v) for v in size.split("*"))
    h, w = area_fit_size(*image_hw, width * height)
    assert h % 64 == 0 and w % 64 == 0 and h * w <= width * height
    assert (h > w) == (image_hw[0] > image_hw[1]) or image_hw[0] == image_hw[1] or abs(h - w) <= 64
    if image_hw[0] * image_hw[1] > width * height:  # big images fill most of the budget
        assert h * w > 0.5 * width * height


def test_official_area_example():
    # A 512*640 (w*h) portrait at the 688*368 budget: 64-multiples in the portrait's shape.
    assert area_fit_size(640, 512, 688 * 368) == (512, 448)


@pytest.fixture(scope="module")
def models(default_models):
    return default_models


def audio(frames: int, rate: int = 16000, channels: int = 2) -> EncodedAudio:
    features = torch.randn(1, 3, 64, frames).bfloat16()
    return EncodedAudio(features, torch.rand(channels, frames * rate // 25) - 0.5, rate)


PROMPT = PromptEmbeddings(torch.randn(5, 48), torch.randn(3, 48))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size="100*96"), "multiple of 16"),
        (dict(size="64*48"), "at least 64"),
        (dict(size_mode="stretch"), "size_mode"),
        (dict(num_clip=-1), "num_clip"),
        (dict(settings=SamplerSettings(infer_frames=30)), "multiple of 4"),
        (dict(settings=SamplerSettings(sample_steps=0)), "sample_steps"),
        (dict(prompt=PromptEmbeddings(torch.randn(5, 48)), settings=SamplerSettings(guide_scale=5)), "negative"),
        (dict(image=torch.rand(8, 8, 3)), "reference image"),
    ],
)
def test_bad_inputs_are_refused_when_the_job_is_made(models, kwargs, message):
    arguments = dict(
        models=models,
        image=torch.rand(200, 160, 3),
        audio=audio(40),
        prompt=PROMPT,
        size="128*96",
        settings=SamplerSettings(),
    )
    arguments.update(kwargs)
    with pytest.raises(InputError, match=message):
        make_job(**arguments)


def test_exact_and_official_area_sizes(models):
    image = torch.rand(640, 512, 3)
    exact = make_job(models, image, audio(40), PROMPT, "688*368", SamplerSettings())
    assert (exact.width, exact.height) == (688, 368)
    area = make_job(models, image, audio(40), PROMPT, "688*368", SamplerSettings(), size_mode="official_area")
    assert (area.width, area.height) == (448, 512)


@pytest.mark.slow
def test_render_writes_the_mp4_and_keeps_frames_with_the_matching_audio(models, tmp_path):
    settings = SamplerSettings(sample_steps=1, infer_frames=16)
    job = make_job(models, torch.rand(96, 128, 3), audio(40, rate=44100), PROMPT, "64*64", settings)
    assert (job.num_clip, job.frame_count) == (3, 37)
    steps = []
    result = render(job, tmp_path / "a.mp4", keep_frames=True, progress=steps.append)
    assert len(steps) == job.total_steps  # the progress bar ends full
    assert result.frames.shape == (37, 64, 64, 3) and result.frames_written == 37
    info = read_video_info(tmp_path / "a.mp4")
    assert info["frames"] == 37 and abs(info["audio_duration_s"] - 37 / 25) <= 1 / 25
    track = job.rendered_audio()
    assert track.shape == (2, round(37 * 44100 / 25))
    assert torch.equal(track[:, :100], job.audio.track[:, round(3 * 44100 / 25) :][:, :100])  # starts at frame 3


def test_mp4_only_keeps_just_the_last_frame(models, tmp_path):
    job = make_job(
        models, torch.rand(96, 128, 3), audio(20), PROMPT, "64*64", SamplerSettings(sample_steps=1, infer_frames=16)
    )
    result = render(job, tmp_path / "b.mp4", keep_frames=False)
    assert result.frames.shape[0] == 1 and result.frames_written == job.frame_count
