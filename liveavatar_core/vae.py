"""The Wan2.1 video VAE: loading, normalised encode/decode, and chunk-by-chunk streaming decode.

The network is diffusers' `AutoencoderKLWan`. This module adds what LiveAvatar needs around it:
loading any release of the weights strictly, the official per-channel latent normalisation, and a
decoder that keeps its causal-convolution caches between chunks so a long video can be decoded
as it is generated. How the network runs (kernels, precision, compiling) is each VAE's own
choice, `WanVAE.kernels` (see `vae_kernels`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .errors import InputError
from .tensor_files import TensorFile, open_tensor_file
from .time_grid import TEMPORAL_STRIDE
from .vae_kernels import VAEKernels
from .vae_keys import LATENT_CHANNELS, RIGHT_FILE, vae_shape, vae_tensors_in_diffusers_names
from .weights import build_empty, load_weights

SPATIAL_STRIDE = 8


def latent_frame_count(video_frames: int) -> int:
    """Latent frames of a video of `video_frames` = 1 + 4k frames (the first frame stands alone)."""
    return 1 + (video_frames - 1) // TEMPORAL_STRIDE


def video_frame_count(latent_frames: int) -> int:
    """Video frames decoded from `latent_frames` latent frames."""
    return 1 + TEMPORAL_STRIDE * (latent_frames - 1) if latent_frames > 0 else 0


class WanVAE:
    r"""
    The Wan2.1 VAE (16 latent channels, stride 4x8x8) with the official latent normalisation.

    Latents given out and taken in are normalised per channel as the official Wan code does:
    `(mu - mean) * (1 / std)`, with the mean/std of the model's config (the official values).

    How the network runs (convolution kernels, bf16 autocast as the official code, compiling)
    are this VAE's options, `kernels` (see `vae_kernels.VAEKernels`); change them with
    `dataclasses.replace(vae.kernels, ...)`.

    Args:
        model (`AutoencoderKLWan`): the loaded network, in eval mode.
        label (`str`): where its weights came from, for messages.
        kernels (`VAEKernels`, *optional*): how it runs; the defaults (from the environment) if None.
    """

    def __init__(self, model: AutoencoderKLWan, label: str = "VAE", kernels: VAEKernels | None = None):
        self.model = model
        self.label = label
        self.kernels = VAEKernels() if kernels is None else kernels
        self.latents_mean = torch.tensor(model.config.latents_mean, dtype=torch.float32)
        self.latents_std = torch.tensor(model.config.latents_std, dtype=torch.float32)
        self._compiled: dict = {}  # (network, backend) -> the compiled per-frame / per-chunk call

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- normalisation ----------------------------------------------------------------------
    def normalize_latents(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE means [B, 16, T, h, w] -> the latents the diffusion model works in (float32)."""
        mean, inv_std = self._stats(mu.device)
        return (mu.float() - mean) * inv_std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents` (float32)."""
        mean, inv_std = self._stats(latents.device)
        # Divides by 1/std, as the official code does, so round trips match it bit for bit.
        return latents.float() / inv_std + mean

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, LATENT_CHANNELS, 1, 1, 1)
        mean = self.latents_mean.to(device).view(shape)
        inv_std = (1.0 / self.latents_std).to(device).view(shape)
        return mean, inv_std

    # -- how the network runs --------------------------------------------------------------
    @contextlib.contextmanager
    def conv_settings(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """A context for running the network on `x` with this VAE's `kernels`: cuDNN
        autotuning, bf16 autocast, and `x` given back channels-last (the weights turned too),
        where those options apply."""
        kernels = self.kernels
        with contextlib.ExitStack() as stack:
            if x.is_cuda:
                if kernels.channels_last and x.ndim == 5:
                    _weights_channels_last_(self.model)
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                stack.enter_context(_cudnn_benchmark(kernels.autotune))
            dtype = kernels.autocast_dtype(x.device, self.dtype)
            if dtype is not None:
                stack.enter_context(torch.autocast(x.device.type, dtype=dtype))
            yield x

    def network_call(self, name: str):
        """`model.decoder` or `model.encoder`, compiled if this VAE compiles (one compiled
        callable per network and backend, kept for the VAE's life)."""
        network = getattr(self.model, name)
        if not self.kernels.compile:
            return network
        key = (name, self.kernels.compile_backend)
        if key not in self._compiled:
            # Static shapes: a video's frames all have one size, and the caches' shapes settle
            # after the second frame, so each size compiles three times (first, second, steady).
            self._compiled[key] = torch.compile(network, dynamic=False, backend=self.kernels.compile_backend)
        return self._compiled[key]

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """A slice of a longer video or latent chunk as a tensor of its own layout when this
        VAE compiles: a slice's strides depend on the length it was cut from, and compiled
        code is specialised on strides, so every new chunk length would compile again."""
        if not self.kernels.compile:
            return x
        layout = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else None
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout or torch.contiguous_format)
        return out.copy_(x)

    # -- encode / decode --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """
        Encodes a video into normalised latents (the mean of the posterior; nothing is sampled).

        Args:
            video (`torch.Tensor`): [B, 3, T, H, W] in [-1, 1], with T = 1 + 4k frames and H, W
                multiples of 8.

        Returns:
            `torch.Tensor`: float32 latents [B, 16, 1 + k, H / 8, W / 8] on the VAE's device.
        """
        _check_video(video)
        with self.conv_settings(video.to(self.device, self.dtype)) as x:
            if self.kernels.compile:
                moments = self._encode_chunks(x)
            else:
                moments = self.model.encode(x).latent_dist.parameters
        mu = moments[:, : self.model.config.z_dim]  # the posterior's mean (its mode); then its log-variance
        return self.normalize_latents(mu)

    def _encode_chunks(self, x: torch.Tensor) -> torch.Tensor:
        # AutoencoderKLWan._encode with our (compiled) encoder: the first frame alone, then
        # chunks of 4, one cache list for the whole video.
        encoder = self.network_call("encoder")
        cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in self.model.encoder.modules())
        # (a one-frame video, the reference image, is the first chunk alone: splitting its empty
        # rest would give one more, empty chunk, which the causal padding cannot take)
        chunks = [x[:, :, :1]] + list(x[:, :, 1:].split(TEMPORAL_STRIDE, dim=2) if x.shape[2] > 1 else [])
        out = torch.cat([encoder(self.network_input(c), feat_cache=cache, feat_idx=[0]) for c in chunks], dim=2)
        return self.model.quant_conv(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes normalised latents into a video, all at once.

        Args:
            latents (`torch.Tensor`): [B, 16, t, h, w] normalised latents.

        Returns:
            `torch.Tensor`: float32 video [B, 3, 1 + 4 (t - 1), 8 h, 8 w] clamped to [-1, 1].
        """
        _check_latents(latents)
        if self.kernels.compile:  # the compiled per-frame decoder; the same frames as below
            with self.streaming_decoder() as decoder:
                return decoder.decode_next(latents)
        z = self.denormalize_latents(latents).to(self.device, self.dtype)
        with self.conv_settings(z) as z:
            return self.model.decode(z).sample.float().clamp_(-1.0, 1.0)

    def decoder_memory(self) -> int:
        """Latent frames back that the streaming decoder's state depends on: a causal
        convolution of temporal kernel k looks k - 1 of its frames back, and its frames are
        never longer than a latent frame, so the sum over the decoder bounds the window. A
        fresh decoder fed that many latents is in the state of one fed all of them."""
        decoder = self.model.decoder
        return 1 + sum(m.kernel_size[0] - 1 for m in decoder.modules() if isinstance(m, WanCausalConv3d))

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder that takes the latents of one video chunk by chunk (see `StreamingDecoder`)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    r"""
    Decodes one latent video chunk by chunk, keeping the causal-convolution caches in between.

    The Wan decoder is causal in time and decodes one latent frame at a time, feeding each
    causal convolution the last frames it saw. This object owns those caches, so chunks decode
    exactly as the whole video would: the concatenated outputs of `decode_next` equal
    `WanVAE.decode` of the concatenated latents. The first latent frame gives 1 video frame,
    every later one 4. The caches belong to this object, not to the model, so whole-video
    encodes and decodes may run between chunks.

    Args:
        vae (`WanVAE`): the VAE whose decoder to run.
    """

    def __init__(self, vae: WanVAE):
        self._vae = vae
        decoder = vae.model.decoder
        self._cache: list | None = [None] * sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())
        self._latent_frames = 0
        self._chunk_shape: tuple[int, ...] | None = None

    @property
    def frames_decoded(self) -> int:
        return video_frame_count(self._latent_frames)

    @torch.no_grad()
    def decode_next(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes the next chunk of latent frames.

        Args:
            latents (`torch.Tensor`): [B, 16, t, h, w] normalised latents that follow the ones
                already given; B, h and w must stay the same for the whole video.

        Returns:
            `torch.Tensor`: float32 video frames [B, 3, n, 8 h, 8 w] in [-1, 1], with n = 1 + 4 (t - 1)
            for the first chunk and 4 t afterwards.
        """
        if self._cache is None:
            raise RuntimeError("This StreamingDecoder is closed; start a new one with vae.streaming_decoder().")
        _check_latents(latents, allow_empty=True)
        batch, _, frames, height, width = latents.shape
        if self._chunk_shape is None:
            self._chunk_shape = (batch, height, width)
        elif self._chunk_shape != (batch, height, width):
            raise InputError(
                f"Latent chunk of batch {batch} and size {height}x{width} does not continue the video being "
                f"decoded (batch {self._chunk_shape[0]}, size {self._chunk_shape[1]}x{self._chunk_shape[2]}). "
                "Start a new streaming decoder for each video."
            )
        vae = self._vae
        if frames == 0:
            return torch.zeros((batch, 3, 0, height * SPATIAL_STRIDE, width * SPATIAL_STRIDE), device=vae.device)
        model = vae.model
        z = vae.denormalize_latents(latents).to(vae.device, vae.dtype)
        with vae.conv_settings(z) as z:
            return self._decode(model, z, frames)

    def _decode(self, model, z: torch.Tensor, frames: int) -> torch.Tensor:
        # A 1x1x1 convolution: frames are independent, so it may run on each chunk alone.
        x = model.post_quant_conv(z)
        decoder = self._vae.network_call("decoder")
        outputs = []
        for i in range(frames):
            # Same per-frame call as AutoencoderKLWan._decode, with our cache instead of the model's.
            outputs.append(
                decoder(
                    self._vae.network_input(x[:, :, i : i + 1]),
                    feat_cache=self._cache,
                    feat_idx=[0],
                    first_chunk=self._latent_frames == 0,
                )
            )
            self._latent_frames += 1
        return torch.cat(outputs, dim=2).float().clamp_(-1.0, 1.0)

    def close(self) -> None:
        """Frees the caches (a few frames of every decoder layer's activations)."""
        self._cache = None

    def __enter__(self) -> StreamingDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@torch.no_grad()
def _weights_channels_last_(model: torch.nn.Module) -> None:
    # Module.to(memory_format=) cannot turn 3-D and 2-D convolutions (the upsamplers') at once.
    for p in model.parameters():
        layout = {5: torch.channels_last_3d, 4: torch.channels_last}.get(p.ndim)
        if layout is not None and not p.is_contiguous(memory_format=layout):
            p.data = p.data.contiguous(memory_format=layout)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """cudnn.benchmark set for the duration of a call (kept if it was on), then put back."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """
    Loads the Wan2.1 VAE from any of its releases, strictly.

    Accepts the official `Wan2.1_VAE.pth`, ComfyUI's `vae/wan_2.1_vae.safetensors`, a whole-model
    file with the VAE under `vae.` or `first_stage_model.`, and diffusers' `AutoencoderKLWan` files.

    Args:
        path: the weights file (or a folder holding one `.safetensors`).
        device: where the weights go.
        dtype: the weights' dtype (float32 reproduces the official code's default).

    Raises:
        CheckpointError: the file is damaged, incomplete, or holds another network (the message
            names the file, what it looks like, and the file to pick instead).
    """
    return vae_from_tensors(open_tensor_file(path), device, dtype, Path(path).name)


def vae_from_tensors(
    tensors: TensorFile, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, label: str = "VAE"
) -> WanVAE:
    """`load_vae` for tensors already opened or in memory (e.g. another loader's state dict)."""
    tensors = vae_tensors_in_diffusers_names(tensors)
    shape = vae_shape(tensors)
    model = build_empty(lambda: AutoencoderKLWan(base_dim=shape.base_dim, z_dim=shape.z_dim))
    load_weights(model, tensors, what="Wan2.1 VAE", device=device, dtype=dtype, fix=RIGHT_FILE)
    return WanVAE(model.eval().requires_grad_(False), label)


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise InputError(f"The VAE takes a video as [batch, 3, frames, height, width]; got shape {tuple(video.shape)}.")
    if not video.is_floating_point():
        raise InputError(f"The VAE takes a float video in [-1, 1]; got dtype {video.dtype}.")
    frames, height, width = video.shape[2:]
    if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        usable = latent_frame_count(frames) if frames >= 1 else 0
        raise InputError(
            f"The VAE encodes 1 + 4k frames (1, 5, 9, ..., 81); got {frames}. Trim the video to "
            f"{video_frame_count(usable)} frames or pad it to {video_frame_count(usable + 1)}."
        )
    if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise InputError(
            f"The VAE needs a height and width that are multiples of {SPATIAL_STRIDE}; got {height}x{width}. "
            "Resize or crop the video."
        )


def _check_latents(latents: torch.Tensor, allow_empty: bool = False) -> None:
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS or (latents.shape[2] == 0 and not allow_empty):
        raise InputError(
            f"The VAE decodes latents shaped [batch, {LATENT_CHANNELS}, frames >= 1, height, width]; "
            f"got shape {tuple(latents.shape)}."
        )
