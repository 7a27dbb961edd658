"""The streaming pipeline end to end on a small random model: frame counts, audio alignment,
the sink roll, bad inputs and stopping."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from conftest import OFFICIAL_TINY
from liveavatar_core.dit import load_dit
from liveavatar_core.errors import InputError
from liveavatar_core.pipeline import StreamingPipeline
from liveavatar_core.run_spec import RunSpec
from liveavatar_core.sizing import fit_reference, parse_size
from liveavatar_core.streaming import GenerationCancelled, SamplerSettings
from liveavatar_core.vae import WanVAE

SMALL = "128*96"


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    vae = WanVAE(AutoencoderKLWan(base_dim=16).eval().requires_grad_(False))
    dit = load_dit(OFFICIAL_TINY / "Wan2.2-S2V-tiny", dtype=torch.float32)
    return StreamingPipeline(dit, vae)


@pytest.fixture(scope="module")
def context():
    return load_file(str(OFFICIAL_TINY / "golden.safetensors"))["context"]


def portrait():
    return torch.rand(120, 90, 3, generator=torch.Generator().manual_seed(5))


def features(frames: int) -> torch.Tensor:
    return torch.randn(1, 25, 32, frames, generator=torch.Generator().manual_seed(6))


def collect(pipeline, context, audio_frames, **kwargs):
    settings = kwargs.pop("settings", SamplerSettings(sample_steps=1, infer_frames=16))
    spec = RunSpec.make(portrait(), features(audio_frames), context, kwargs.pop("size", SMALL), settings, **kwargs)
    chunks = list(pipeline.stream(spec))
    return chunks, torch.cat([c.frames for c in chunks])


@pytest.mark.slow
def test_auto_clip_count_follows_the_audio_and_trims_to_it(pipeline, context):
    chunks, frames = collect(pipeline, context, audio_frames=40)  # 2.5 clips of 16 frames
    assert {c.clip for c in chunks} == {0, 1, 2}
    assert frames.shape == (40 - 3, 96, 128, 3)  # video starts 3 frames in; audio is cut to match
    assert frames.dtype == torch.float32 and 0 <= frames.min() and frames.max() <= 1


@pytest.mark.slow
def test_fixed_clip_count_renders_past_the_audio_with_silence_when_asked(pipeline, context):
    _, frames = collect(pipeline, context, audio_frames=10, num_clip=2, trim_to_audio=False)
    assert frames.shape[0] == 2 * 16 - 3


@pytest.mark.slow
def test_same_seed_gives_the_same_frames(pipeline, context):
    _, a = collect(pipeline, context, audio_frames=20)
    _, b = collect(pipeline, context, audio_frames=20)
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("overlap_decode", [False, True], ids=["decode in line", "decode beside"])
def test_stop_keeps_everything_finished_before_it(pipeline, context, overlap_decode):
    runner = StreamingPipeline(pipeline.dit, pipeline.vae, overlap_decode=overlap_decode)
    seen = []
    calls = iter(range(10**6))
    with pytest.raises(GenerationCancelled):
        spec = RunSpec.make(portrait(), features(64), context, SMALL, SamplerSettings(sample_steps=1, infer_frames=16))
        for chunk in runner.stream(spec, should_stop=lambda: next(calls) >= 4):
            seen.append(chunk)
    assert [(c.clip, c.block) for c in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.slow
def test_decoding_beside_generation_gives_the_same_chunks(pipeline, context):
    overlapped = StreamingPipeline(pipeline.dit, pipeline.vae, overlap_decode=True)
    in_line, frames = collect(pipeline, context, audio_frames=20)  # two clips: the sink roll waits for clip 0
    beside, frames_beside = collect(overlapped, context, audio_frames=20)
    assert [(c.clip, c.block, c.ends_clip) for c in beside] == [(c.clip, c.block, c.ends_clip) for c in in_line]
    assert torch.equal(frames_beside, frames)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size="100*96"), "multiple of 16"),
        (dict(size="big"), "width\\*height"),
        (dict(num_clip=0), "num_clip must be at least 1"),
        (dict(settings=SamplerSettings(infer_frames=30)), "multiple of 4"),
        (dict(settings=SamplerSettings(sample_steps=60)), "between 1 and 50"),
    ],
)
def test_bad_inputs_fail_before_any_compute(pipeline, context, kwargs, message):
    with pytest.raises(InputError, match=message):
        collect(pipeline, context, audio_frames=20, **kwargs)


def test_empty_audio_is_refused(pipeline, context):
    with pytest.raises(InputError, match="audio is empty"):
        collect(pipeline, context, audio_frames=0)


def test_reference_is_cropped_not_stretched():
    image = torch.zeros(100, 300, 3)
    image[:, 100:200] = 1.0  # a white square in the middle of a wide image
    pixels = fit_reference(image, 64, 64)
    assert pixels.shape == (1, 3, 1, 64, 64)
    assert pixels[..., 4:-4].min() > 0.9  # the centre crop is the white square (edges blend)
    assert pixels.mean() > 0.9
    assert parse_size("688*368") == (688, 368)


def sine(seconds: float, rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (0.3 * torch.sin(2 * torch.pi * 220 * t))[None]


@pytest.mark.slow
def test_three_clips_at_preview_size_make_a_playable_mp4_with_audio(pipeline, context, tmp_path):
    """3 clips of 48 frames at 384*256: the file read back has the frames, size, fps and audio."""
    from liveavatar_core.pipeline import write_video
    from liveavatar_core.time_grid import FPS, VIDEO_START_OFFSET
    from liveavatar_core.video_writer import read_video_info

    frames = 3 * 48
    audio = sine(frames / FPS)
    chunks = pipeline.stream(
        RunSpec.make(portrait(), features(frames), context, "384*256", SamplerSettings(sample_steps=1))
    )
    path = tmp_path / "avatar.mp4"
    written = write_video(chunks, path, audio, 16000, "384*256")
    info = read_video_info(path)
    assert written == info["frames"] == frames - VIDEO_START_OFFSET
    assert (info["width"], info["height"], round(info["fps"])) == (384, 256, FPS)
    assert abs(info["audio_duration_s"] - info["frames"] / FPS) <= 1 / FPS


@pytest.mark.slow
def test_run_stopped_after_two_clips_leaves_those_clips_with_audio(pipeline, context, tmp_path):
    from liveavatar_core.pipeline import write_video
    from liveavatar_core.time_grid import FPS
    from liveavatar_core.video_writer import read_video_info

    infer = 16
    finished = []
    spec = RunSpec.make(
        portrait(), features(5 * infer), context, SMALL, SamplerSettings(sample_steps=1, infer_frames=infer)
    )
    chunks = pipeline.stream(spec, should_stop=lambda: len(finished) >= 2)

    def tracked():
        for chunk in chunks:
            if chunk.ends_clip:
                finished.append(chunk.clip)
            yield chunk

    path = tmp_path / "stopped.mp4"
    with pytest.raises(GenerationCancelled):
        write_video(tracked(), path, sine(5 * infer / FPS), 16000, SMALL)
    info = read_video_info(path)
    assert finished == [0, 1]
    assert info["frames"] == 2 * infer - 3
    assert abs(info["audio_duration_s"] - info["frames"] / FPS) <= 1 / FPS
