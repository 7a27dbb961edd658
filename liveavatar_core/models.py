"""The four LiveAvatar networks loaded together, and where their weights live while idle.

`load_models` reads every file with the package's loaders, merges the LiveAvatar LoRA into
the DiT, and checks that the networks fit each other (text width, audio width and layers)
before any generation starts, so a wrong file in a folder is named at load time.

With `offload=True` a network sits on the CPU except while it runs (`on_device`): the
encoders move to the GPU for one encode, the DiT and VAE for one whole video. Without it,
everything stays on the device (the fastest choice when memory allows).

Who moves the weights is a `Placement`: plain `.to()` calls by default (`TorchPlacement`);
a host with its own memory manager (ComfyUI) gives one that asks that manager instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .audio_encoder import AudioEncoder, load_audio_encoder
from .dit import WanS2VTransformer, load_dit
from .dit.fp8 import dequantize_dit_, has_fp8_layers, quantize_dit_
from .errors import CheckpointError, InputError
from .finite import require_finite
from .lora import merge_lora
from .model_files import WEIGHT_DTYPES, ModelFiles, Precision, whole_checkpoint
from .text_encoder import TextEncoder, load_text_encoder
from .vae import WanVAE, load_vae

__all__ = [
    "WEIGHT_DTYPES",
    "LiveAvatarModels",
    "ModelFiles",
    "Precision",
    "load_dit_as",
    "load_models",
    "whole_checkpoint",
]

logger = logging.getLogger(__name__)


class Placement(Protocol):
    """Moves networks between the compute device and where they wait while idle."""

    def acquire(self, networks: dict[str, torch.nn.Module], device: torch.device) -> None:
        """Puts every network on `device` (and keeps it there until `release`)."""

    def release(self, networks: dict[str, torch.nn.Module], home: torch.device, offload: bool) -> None:
        """The block that needed them is over; with `offload`, send them to `home`."""


class TorchPlacement:
    """Plain `.to()` moves: the default outside a host with its own memory manager."""

    def acquire(self, networks: dict[str, torch.nn.Module], device: torch.device) -> None:
        for module in networks.values():
            module.to(device)

    def release(self, networks: dict[str, torch.nn.Module], home: torch.device, offload: bool) -> None:
        if not offload:
            return
        for module in networks.values():
            module.to(home)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


@dataclass
class LiveAvatarModels:
    dit: WanS2VTransformer
    vae: WanVAE
    text_encoder: TextEncoder | None  # None: prompts come encoded from elsewhere
    audio_encoder: AudioEncoder
    device: torch.device
    offload: bool = False
    precision: Precision = Precision()  # the DiT's weights, as loaded
    # Where the networks came from: worker processes of a multi-GPU run load their own copies.
    files: ModelFiles | None = None
    placement: Placement = field(default_factory=TorchPlacement)

    @property
    def home(self) -> torch.device:
        """Where idle weights wait."""
        return torch.device("cpu") if self.offload else self.device

    @contextlib.contextmanager
    def on_device(self, *networks: str) -> Iterator[None]:
        """Keeps the named networks ('dit', 'vae', 'text_encoder', 'audio_encoder') on the
        compute device for the duration of the block, then sends them home again."""
        modules = {name: self.module(name) for name in networks}
        self.placement.acquire(modules, self.device)
        try:
            yield
        finally:
            self.placement.release(modules, self.home, self.offload)

    def module(self, name: str) -> torch.nn.Module:
        """The `torch.nn.Module` holding the weights of the network `name`."""
        network = getattr(self, name)
        if network is None:
            raise InputError(f"no {name.replace('_', ' ')} was loaded with these models.")
        return network.model if isinstance(network, WanVAE) else network


def load_models(
    files: ModelFiles,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    offload: bool = False,
    compile_elementwise: bool | None = None,
    vae: WanVAE | None = None,
    audio_encoder: AudioEncoder | None = None,
) -> LiveAvatarModels:
    """Loads the DiT (+ LoRA), umT5, Wan VAE and wav2vec2 from `files`.

    `dtype` is the DiT's and umT5's weight dtype; the VAE and wav2vec2 use it on GPUs and
    float32 on the CPU, where half-precision convolutions are slow. fp8 (`float8_e4m3fn`)
    puts the DiT's linear layers in fp8 and the rest in bf16. `compile_elementwise` turns the
    DiT's compiled element-wise chains (`dit.fused`) on or off (None: the default, see
    `dit.kernels`).
    With fp8 and `offload`, a run's attention caches in host memory (`RunSpec.kv_cache`) make
    the low-VRAM mode. `vae` and `audio_encoder`, when given, are used
    instead of loading `files.vae` / `files.audio_encoder` (they are checked and placed alike).
    Raises CheckpointError
    naming the file when one holds another network or the networks do not fit together.
    """
    device = torch.device(device)
    require_finite(
        "lora_strength", files.lora_strength, "Give a number from -2 to 2; 1.0 is what LiveAvatar was trained for."
    )
    precision = Precision.of(dtype)
    dtype, small_dtype = precision.dense, precision.small(device)
    home = torch.device("cpu") if offload else device

    dit = load_dit_as(files, home, precision, compile_elementwise)
    text_encoder = (
        None if files.text_encoder is None else load_text_encoder(files.text_encoder, device=home, dtype=dtype)
    )
    if text_encoder is not None and text_encoder.model.config.d_model != dit.config.text_dim:
        raise CheckpointError(
            f"the text encoder {Path(files.text_encoder).name} gives {text_encoder.model.config.d_model}-wide "
            f"embeddings but the diffusion model {Path(files.dit).name} expects {dit.config.text_dim}. "
            "Pick the umT5-XXL file that belongs to Wan2.2 (umt5_xxl_*.safetensors)."
        )
    if audio_encoder is None:
        audio_encoder = load_audio_encoder(
            _required(files.audio_encoder, "audio_encoder"), device=home, dtype=small_dtype
        )
    else:
        audio_encoder.to(home, small_dtype)
    audio_encoder.check_fits(dit.config.audio_dim, dit.config.num_audio_layers)
    if vae is None:
        vae = load_vae(_required(files.vae, "vae"), device=home, dtype=small_dtype)
    else:
        torch.nn.Module.to(vae.model, home, small_dtype)  # diffusers' own .to() warns on every dtype cast
    if vae.model.config.z_dim != dit.config.in_dim:
        raise CheckpointError(
            f"the VAE {vae.label} has {vae.model.config.z_dim} latent channels but the diffusion "
            f"model expects {dit.config.in_dim}. Pick the Wan 2.1 VAE (wan_2.1_vae.safetensors)."
        )
    return LiveAvatarModels(dit, vae, text_encoder, audio_encoder, device, offload, precision, files)


def load_dit_as(
    files: ModelFiles, home: torch.device, precision: Precision, compile_elementwise: bool | None = None
) -> WanS2VTransformer:
    """The DiT of `files` with the LoRA merged, its linear layers in fp8 or in the dense dtype
    whatever the file holds. An fp8 run of a bf16 file is loaded on the CPU and quantised layer
    by layer into `home`, so the bf16 weights never need room on the GPU. `compile_elementwise`:
    see `load_models`."""
    fp8 = precision.fp8
    dit = load_dit(whole_checkpoint(files.dit), device="cpu" if fp8 else home, dtype=precision.dense)
    lora = files.lora is not None and files.lora_strength != 0
    if has_fp8_layers(dit) and (lora or not fp8):
        dequantize_dit_(dit)  # a LoRA merges into full-precision weights
    if lora:
        report = merge_lora(dit, files.lora, files.lora_strength)
        logger.info("LiveAvatar LoRA: %s", report)
    if fp8:
        quantize_dit_(dit, home)
    if compile_elementwise is not None:
        dit.kernels = dataclasses.replace(dit.kernels, compile_elementwise=compile_elementwise)
    return dit.to(home)


def _required(path: Path | None, name: str) -> Path:
    if path is None:
        raise InputError(f"{name}: no file given; pick one (or pass the network ready-made).")
    return path
