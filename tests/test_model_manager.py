"""Our networks in ComfyUI 0.3.75's model manager (on the CPU, read from its bookkeeping):
loaded through it, unloaded by it when a later step needs the memory, and still sent home
by offload_model."""

from __future__ import annotations

import pytest
import torch

from liveavatar_core.default_models import DEFAULT_FILES, write_random_models
from liveavatar_core.generation import render
from nodes import comfy_bridge
from nodes.encode import EncodeAudio, EncodePrompt
from nodes.loader import LoadLiveAvatarModel
from nodes.sampler import LiveAvatarSampler

pytestmark = pytest.mark.slow  # each test runs the whole pipeline

NETWORKS = ("dit", "vae", "text_encoder", "audio_encoder")


@pytest.fixture(scope="module")
def manager(comfyui, tmp_path_factory):
    import comfy.model_management
    import folder_paths

    models = tmp_path_factory.mktemp("models")
    write_random_models(models)
    for folder in DEFAULT_FILES:
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    return comfy.model_management


@pytest.fixture(autouse=True)
def no_unload_all(manager, monkeypatch):
    """Ours must leave the choice of what to unload to ComfyUI."""

    def refuse():
        raise AssertionError("unload_all_models() called: it throws out every other workflow's models")

    monkeypatch.setattr(manager, "unload_all_models", refuse)
    yield
    manager.free_memory(1e30, torch.device("cpu"))  # the next test starts with nothing loaded


def load(offload: bool):
    return LoadLiveAvatarModel().load(
        diffusion_model=DEFAULT_FILES["diffusion_models"],
        lora=DEFAULT_FILES["loras"],
        lora_strength=1.0,
        text_encoder=DEFAULT_FILES["text_encoders"],
        vae=DEFAULT_FILES["vae"],
        audio_encoder=DEFAULT_FILES["audio_encoders"],
        weight_dtype="fp32",
        offload_model=offload,
        compile=False,
    )[0]


def make_video(models) -> torch.Tensor:
    """Our workflow: encode audio and prompt, sample and decode one short clip."""
    t = torch.arange(16000) / 16000
    audio = {"waveform": (0.3 * torch.sin(2 * torch.pi * 220 * t))[None, None], "sample_rate": 16000}
    features = EncodeAudio().encode(models, audio, 8)[0]
    prompt = EncodePrompt().encode(models, "A person talks.", "")[0]
    (job,) = LiveAvatarSampler().prepare(
        models,
        torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
        features,
        prompt,
        "64*64",
        "exact",
        1,
        2,
        8,
        "euler",
        0.0,
        0,
        True,
    )
    return render(job, None, keep_frames=True).frames


def loaded(models) -> set[str]:
    """Which of our networks ComfyUI's manager holds loaded now."""
    patchers = comfy_bridge.loaded_patchers()
    return {
        name
        for name in NETWORKS
        if any(p is models.placement.patcher(models.module(name), models.device) for p in patchers)
    }


def test_comfyui_unloads_ours_when_a_later_step_needs_the_memory(manager):
    models = load(offload=False)
    assert loaded(models) == set(NETWORKS)  # counted from the moment they are loaded
    first = make_video(models)
    assert loaded(models) == set(NETWORKS)

    # What a core node does before it runs (load_models_gpu -> free_memory): ComfyUI picks ours.
    manager.free_memory(1e30, models.device)
    assert loaded(models) == set()
    patcher = models.placement.patcher(models.module("dit"), models.device)
    assert patcher.loaded_size() == 0

    again = make_video(models)  # ours load again through the manager, and make the same video
    assert loaded(models) == set(NETWORKS)
    assert torch.equal(again, first)


def test_offload_model_unloads_each_network_when_its_step_is_over(manager):
    models = load(offload=True)
    assert loaded(models) == set()
    while_running = []
    acquire = models.placement.acquire

    def acquire_and_look(networks, device):
        acquire(networks, device)
        while_running.append(loaded(models))

    models.placement.acquire = acquire_and_look
    make_video(models)
    assert while_running == [{"audio_encoder"}, {"text_encoder"}, {"dit", "vae"}]
    assert loaded(models) == set()
    for name in NETWORKS:
        assert next(models.module(name).parameters()).device.type == "cpu"
        assert models.placement.patcher(models.module(name), models.device).offload_device == torch.device("cpu")
