"""Shared test fixtures: the reference data, the embedded default (tiny) models, and a real
ComfyUI 0.3.75 on the import path."""

from __future__ import annotations

import os
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_tiny"
# scripts/setup_env.sh copies ComfyUI's source here; LIVEAVATAR_COMFYUI overrides it.
COMFYUI_DIR = Path(os.environ.get("LIVEAVATAR_COMFYUI", ROOT / ".venv" / "ComfyUI"))

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# The tests run worker processes on the CPU (the ComfyUI servers they start inherit this).
os.environ.setdefault("LIVEAVATAR_CPU_WORKERS", "1")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64: the figure every equality test asserts on."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    """A 16-bit mono WAV of `samples` (clipped to -1..1), as a user's recording would be."""
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="session")
def comfyui():
    """Imports ComfyUI's `comfy` package on the CPU (for comparisons against its modules)."""
    if not (COMFYUI_DIR / "comfy").is_dir():
        pytest.fail(f"ComfyUI source not found at {COMFYUI_DIR}; run scripts/setup_env.sh first.")
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy

    return comfy


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    """The tiny official model's reference tensors (inputs and outputs of one DiT call)."""
    from safetensors.torch import load_file

    return load_file(str(OFFICIAL_TINY / "golden.safetensors"))


@pytest.fixture(scope="session")
def default_model_files(tmp_path_factory) -> dict[str, Path]:
    """Seeded random stand-ins for the default models, written once (read-only for the tests):
    {ComfyUI folder: file}. The plumbing's tests run on these, the smallest widths; the shipped
    trained files have their own tests (test_default_models, test_default_model_talks)."""
    from liveavatar_core.default_models import write_random_models

    return write_random_models(tmp_path_factory.mktemp("default_models"))


@pytest.fixture(scope="session")
def default_models(default_model_files):
    """Those files loaded in float32 on the CPU, as the job API sees them."""
    from liveavatar_core.models import ModelFiles, load_models

    paths = default_model_files
    files = ModelFiles(
        dit=paths["diffusion_models"],
        text_encoder=paths["text_encoders"],
        vae=paths["vae"],
        audio_encoder=paths["audio_encoders"],
        lora=paths["loras"],
    )
    return load_models(files, dtype="fp32")


# The loader widget that picks each model folder's file, and the tiny upscaler the servers hold.
WIDGET_FOR_FOLDER = {
    "diffusion_models": "diffusion_model",
    "loras": "lora",
    "text_encoders": "text_encoder",
    "vae": "vae",
    "audio_encoders": "audio_encoder",
}
TINY_UPSCALER = "tiny_2x.safetensors"  # a 2x ESRGAN with random weights, for the Long + upscale preset


def serve_small_models(base: Path):
    """A real ComfyUI server in `base` with the small random stand-ins of the default models
    (under the default models' names), the tiny upscaler and the
    example media in place (a generator for module-scoped fixtures)."""
    from comfyui_client import ComfyUIServer, copy_example_media
    from tiny_upscaler import write_tiny_esrgan

    from liveavatar_core.default_models import write_random_models

    with ComfyUIServer(base) as running:
        write_random_models(base / "models")
        write_tiny_esrgan(base / "models" / "upscale_models" / TINY_UPSCALER)
        copy_example_media(base)
        yield running
