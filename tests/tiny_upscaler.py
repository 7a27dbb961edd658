"""A tiny 2x ESRGAN-architecture upscale model with random weights, as a file spandrel loads
(the same loader ComfyUI's Load Upscale Model uses)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tiny_esrgan(path: Path, seed: int = 0) -> Path:
    """Writes an old-arch ESRGAN state dict (8 filters, 1 RRDB block, one 2x upsampling stage)."""
    generator = torch.Generator().manual_seed(seed)

    def conv(name: str, out_ch: int, in_ch: int, state: dict) -> None:
        state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * (0.5 / (in_ch * 9) ** 0.5)
        state[f"{name}.bias"] = torch.zeros(out_ch)

    nf, gc = 8, 32  # spandrel reads the growth channels as 32, ESRGAN's own
    state: dict[str, torch.Tensor] = {}
    conv("model.0", nf, 3, state)
    for rdb in (1, 2, 3):
        for index in range(1, 6):
            out_ch = nf if index == 5 else gc
            conv(f"model.1.sub.0.RDB{rdb}.conv{index}.0", out_ch, nf + (index - 1) * gc, state)
    conv("model.1.sub.1", nf, nf, state)
    conv("model.3", nf, nf, state)  # after the 2x nearest upsample (model.2)
    conv("model.5", nf, nf, state)
    conv("model.7", 3, nf, state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def load_upscaler(path: Path):
    """Loads the file as ComfyUI's Load Upscale Model does."""
    from safetensors.torch import load_file
    from spandrel import ImageModelDescriptor, ModelLoader

    model = ModelLoader().load_from_state_dict(load_file(str(path))).eval()
    assert isinstance(model, ImageModelDescriptor)
    return model
