"""Shared test fixtures: the reference data and a real ComfyUI 0.3.75 on the import path."""

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
