"""Per-block post-processing in the stream: Stream Upscale with a spandrel model (core's
UPSCALE_MODEL), Stream Face Restore, their sizes in the mp4 and memory flat over many clips."""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import pytest
import torch
from tiny_upscaler import load_upscaler, write_tiny_esrgan

from conftest import ROOT
from liveavatar_core.default_models import default_model_paths, write_random_models
from liveavatar_core.errors import InputError
from liveavatar_core.face_restore import FaceRegion, FaceRestore
from liveavatar_core.generation import EncodedAudio, PromptEmbeddings, make_job, render
from liveavatar_core.models import ModelFiles, load_models
from liveavatar_core.stream_transforms import TransformedJob
from liveavatar_core.streaming import SamplerSettings
from liveavatar_core.upscale import ModelUpscale
from liveavatar_core.video_writer import read_video_info

PROMPT = PromptEmbeddings(torch.randn(5, 48), torch.randn(3, 48))
QUICK = SamplerSettings(sample_steps=1, infer_frames=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_random_models(folder)
    paths = default_model_paths(folder)
    files = ModelFiles(
        dit=paths["diffusion_models"],
        text_encoder=paths["text_encoders"],
        vae=paths["vae"],
        audio_encoder=paths["audio_encoders"],
        lora=paths["loras"],
    )
    return load_models(files, dtype="fp32")


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    return load_upscaler(write_tiny_esrgan(tmp_path_factory.mktemp("upscale_models") / "tiny_2x.safetensors"))


@pytest.fixture(scope="module")
def nodes(comfyui):
    # Under its own name: ComfyUI's `nodes` module holds the plain name.
    spec = importlib.util.spec_from_file_location(
        "liveavatar_nodes", ROOT / "nodes" / "__init__.py", submodule_search_locations=[str(ROOT / "nodes")]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["liveavatar_nodes"] = package
    spec.loader.exec_module(package)
    return package.LiveAvatarStreamUpscale(), package.LiveAvatarStreamFaceRestore()


def job_of(models, clips: int, size: str = "64*64", settings: SamplerSettings = QUICK):
    frames = clips * settings.infer_frames
    audio = EncodedAudio(torch.randn(1, 3, 64, frames).bfloat16(), torch.rand(2, frames * 640) - 0.5, 16000)
    return make_job(models, torch.rand(96, 128, 3), audio, PROMPT, size, settings, num_clip=clips)


def test_the_tiny_model_loads_as_an_upscale_model(upscaler):
    assert upscaler.architecture.id == "ESRGAN" and upscaler.scale == 2
    assert upscaler(torch.rand(1, 3, 10, 12)).shape == (1, 3, 20, 24)


@pytest.mark.slow
def test_stream_upscale_gives_the_models_frames_and_the_new_size(models, upscaler, nodes, tmp_path):
    job = job_of(models, clips=2)
    (upscaled,) = nodes[0].wrap(job, upscaler, 1.0)
    assert (upscaled.width, upscaled.height) == (128, 128)
    assert upscaled.frame_count == job.frame_count and upscaled.total_steps == job.total_steps
    plain = render(job, None, keep_frames=True).frames
    result = render(upscaled, tmp_path / "up.mp4", keep_frames=True)
    assert result.frames.shape == (job.frame_count, 128, 128, 3)
    # One 512-pixel tile covers these frames: the output is the model's own, frame for frame.
    with torch.no_grad():
        expected = upscaler(plain.movedim(-1, -3)).clamp(0, 1).movedim(-3, -1)
    assert torch.allclose(result.frames, expected, atol=1e-5)
    info = read_video_info(tmp_path / "up.mp4")
    assert (info["width"], info["height"], info["frames"]) == (128, 128, job.frame_count)


def test_rescale_factor_and_chained_stream_nodes(models, upscaler, nodes, tmp_path):
    job = job_of(models, clips=1)
    (half,) = nodes[0].wrap(job, upscaler, 0.75)  # 2x * 0.75 = 1.5x: 96*96
    assert (half.width, half.height) == (96, 96)
    (restored,) = nodes[1].wrap(half, upscaler, 0.5, 0.4, 0.6, 1.0)  # the same size
    assert (restored.width, restored.height) == (96, 96)
    render(restored, tmp_path / "chain.mp4", keep_frames=False)
    info = read_video_info(tmp_path / "chain.mp4")
    assert (info["width"], info["height"], info["frames"]) == (96, 96, job.frame_count)


def test_bad_upscale_inputs_are_refused_and_odd_sides_rounded_to_even(models, upscaler, nodes):
    job = job_of(models, clips=1)
    with pytest.raises(InputError, match="rescale_factor"):
        nodes[0].wrap(job, upscaler, 9.0)
    with pytest.raises(InputError, match="upscale_model is not an image model"):
        nodes[0].wrap(job, "4x-UltraSharp.pth", 1.0)
    (odd,) = nodes[0].wrap(job, upscaler, 0.7)  # 64 * 1.4 = 89.6: rounded to an even 90
    assert (odd.width, odd.height) == (90, 90)


def test_tiles_halve_when_the_device_runs_out_of_memory():
    tiles = []

    def run_tiled(images, tile, overlap):
        tiles.append(tile)
        if tile > 128:
            raise torch.OutOfMemoryError("out of memory")
        return images.repeat_interleave(2, -1).repeat_interleave(2, -2)

    upscale = ModelUpscale(run_tiled, scale=2)
    frames = torch.rand(3, 20, 30, 3)
    out = upscale.apply(frames)
    assert tiles == [512, 256, 128] and out.shape == (3, 40, 60, 3)
    assert torch.equal(out[:, ::2, ::2], frames)
    upscale.apply(frames)
    assert tiles[-1] == 128  # the tile that fitted is kept for the next blocks

    def never_fits(images, tile, overlap):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        ModelUpscale(never_fits, scale=2).apply(frames)


def test_face_restore_changes_only_the_face_square():
    frames = torch.rand(5, 60, 80, 3)
    region = FaceRegion(center_x=0.5, center_y=0.5, size=0.5)  # a 30-pixel square at (25, 15)
    restore = FaceRestore(lambda faces: torch.zeros_like(faces), region, input_size=None, feather=0.0)
    out = restore.apply(frames)
    left, top, side, _ = region.box(80, 60)
    assert (left, top, side) == (25, 15, 30)
    inside = (slice(None), slice(top, top + side), slice(left, left + side))
    assert torch.equal(out[inside], torch.zeros_like(out[inside]))
    outside = out.clone()
    outside[inside] = frames[inside]
    assert torch.equal(outside, frames)
    half = FaceRestore(lambda faces: torch.zeros_like(faces), region, input_size=None, strength=0.5, feather=0.0)
    assert torch.allclose(half.apply(frames)[inside], frames[inside] * 0.5)


def test_face_restore_feathers_the_edge_and_resizes_for_the_model():
    seen = []

    def restore(faces):
        seen.append(tuple(faces.shape))
        return torch.ones(faces.shape[0], 3, 2 * faces.shape[2], 2 * faces.shape[3])  # any size comes back

    frames = torch.zeros(2, 100, 100, 3)
    out = FaceRestore(restore, FaceRegion(0.5, 0.5, 0.8), input_size=64, feather=0.25).apply(frames)
    assert seen == [(2, 3, 64, 64)]
    row = out[0, 50, :, 0]
    assert row[50] == 1.0 and 0 < row[12] < row[20] < 1.0 and row[5] == 0.0  # a ramp, not a seam


@pytest.mark.parametrize("region, message", [(FaceRegion(center_x=1.5), "center_x"), (FaceRegion(size=0.0), "size")])
def test_bad_face_regions_are_refused(region, message):
    with pytest.raises(InputError, match=message):
        FaceRestore(lambda faces: faces, region)


@pytest.mark.slow
def test_a_transform_returning_the_wrong_size_is_named(models):
    class Broken(ModelUpscale):
        def apply(self, frames):
            return frames

    job = TransformedJob(job_of(models, clips=1), Broken(lambda *a: None, scale=2))
    with pytest.raises(RuntimeError, match="Stream Upscale returned frames of shape"):
        render(job, None, keep_frames=True)


@pytest.mark.slow
def test_the_model_is_on_the_device_only_while_the_stream_runs(models):
    events = []

    @contextlib.contextmanager
    def on_device():
        events.append("on")
        yield
        events.append("off")

    upscale = ModelUpscale(
        lambda images, tile, overlap: images.repeat_interleave(2, -1).repeat_interleave(2, -2),
        scale=2,
        on_device=on_device,
    )
    job = TransformedJob(job_of(models, clips=2), upscale)
    for _ in job.frames():
        assert events == ["on"]
    assert events == ["on", "off"]


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_memory_stays_flat_over_many_upscaled_clips(models, upscaler, nodes, tmp_path):
    clips = 14
    job = job_of(models, clips=clips)
    (upscaled,) = nodes[0].wrap(job, upscaler, 4.0)  # 2x model, then 4x: 512*512 frames, 25 MB a clip
    rss = []
    render(upscaled, tmp_path / "long.mp4", keep_frames=False, on_frames=lambda frames: rss.append(resident_mb()))
    per_clip = len(rss) // clips
    settled, end = rss[4 * per_clip - 1], rss[-1]
    print(f"RSS after clip 4: {settled:.0f} MB, after clip {clips}: {end:.0f} MB, peak {max(rss):.0f} MB")
    kept = (clips - 4) * QUICK.infer_frames * 512 * 512 * 3 * 4 / 2**20
    assert end - settled < 60, (
        f"resident memory grew by {end - settled:.0f} MB over {clips - 4} clips "
        f"(keeping the frames would add {kept:.0f} MB)"
    )
    info = read_video_info(tmp_path / "long.mp4")
    assert (info["width"], info["height"], info["frames"]) == (512, 512, job.frame_count)
