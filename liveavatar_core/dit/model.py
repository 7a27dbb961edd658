"""The Wan2.2-S2V DiT (the LiveAvatar backbone) with the official checkpoint's parameter names.

Token sequence of one forward pass: the noisy video tokens, then the reference-frame tokens,
then the packed motion tokens. The reference and motion tokens (the "sink") always carry
timestep 0. Audio tokens are injected into the video tokens after selected blocks.

Where ComfyUI 0.3.75's own `WanModel_S2V` differs from the official code (the official code
is the one LiveAvatar was trained with, so it is what we follow):
- the audio is padded at the front with `motion_frames` copies of its first feature frame
  before the causal audio encoder, and the first `motion_latent_frames` outputs are dropped;
- the reference frame sits at temporal RoPE index 30, motion tokens at negative indices;
- reference and motion tokens are modulated with timestep 0 (`zero_timestep`), the video
  tokens with the sampling timestep;
- text embeddings are zero-padded to `text_len` (512) tokens before the text projection, so
  the padding rows (projection biases) take part in cross-attention.

How the model runs (compiled element-wise chains, attention kernel, ...) is its `kernels`,
in force while it runs (`running`; see `kernels`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from .audio import AudioInjector, CausalAudioEncoder
from .blocks import Head, S2VBlock, segment_ids
from .config import S2VConfig
from .kernels import Kernels, use
from .motion import FramePacker
from .rope import grid_positions, rope_cos_sin, video_grid

VIDEO, REFERENCE, MOTION = 0, 1, 2  # rows of `trainable_cond_mask`


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] (cos first, then sin), computed in float64."""
    half = dim // 2
    position = timesteps.double()
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class WanS2VTransformer(nn.Module):
    def __init__(self, config: S2VConfig):
        super().__init__()
        self.config = c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(S2VBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers))
        self.head = Head(c.dim, c.out_dim * math.prod(c.patch_size), c.eps)
        if c.cond_dim:
            self.cond_encoder = nn.Conv3d(c.cond_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(c.audio_dim, c.dim, c.num_audio_layers, c.num_audio_token)
        self.audio_injector = AudioInjector(c.dim, c.num_heads, len(c.audio_inject_layers), c.eps)
        self.trainable_cond_mask = nn.Embedding(3, c.dim)
        self.frame_packer = FramePacker(c.dim, c.in_dim, c.framepack_buckets)
        self.injector_after = {layer: i for i, layer in enumerate(c.audio_inject_layers)}
        self.kernels = Kernels()

    def running(self) -> contextlib.AbstractContextManager[None]:
        """This model's `kernels` in force for the block: wraps every call into the model."""
        return use(self.kernels)

    # -- inputs -> tokens -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def embed_text(self, context: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Text embeddings (list of [L_i, text_dim], or [B, L, text_dim]) -> [B, text_len, dim]."""
        c = self.config
        rows = [u[: c.text_len] for u in context]
        padded = torch.stack([torch.cat([u, u.new_zeros(c.text_len - u.shape[0], u.shape[1])]) for u in rows])
        return self.text_embedding(padded.to(self.dtype))

    def embed_time(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] timesteps -> (head embedding [N, dim], block modulation [N, 6, dim]), float32."""
        sinusoid = timestep_embedding(timesteps.flatten(), self.config.freq_dim).float()
        emb = self.time_embedding(sinusoid.to(self.dtype)).float()
        return emb, self.time_projection(emb.to(self.dtype)).float().unflatten(1, (6, self.config.dim))

    def embed_audio(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav2vec2 features [B, layers, audio_dim, 4*F] -> (global, local) tokens per latent frame.

        The causal encoder first sees `motion_frames` copies of the first feature frame, standing
        in for the audio of the motion context; those outputs are dropped.
        """
        lead = self.config.motion_frames
        padded = torch.cat([audio[..., :1].expand(*audio.shape[:-1], lead), audio], dim=-1)
        glob, local = self.casual_audio_encoder(padded)
        skip = self.config.motion_latent_frames
        return glob[:, skip:].float(), local[:, skip:].float()

    def embed_video(self, latents: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy latents [B, C, F, H, W] (+ pose condition) -> tokens [B, F*H'*W', dim]."""
        x = self.patch_embedding(latents.to(self.dtype))
        if hasattr(self, "cond_encoder"):
            if cond is None:
                cond = latents.new_zeros(latents.shape[0], self.config.cond_dim, *latents.shape[2:])
            x = x + self.cond_encoder(cond.to(self.dtype))
        return x.flatten(2).transpose(1, 2)

    def video_positions(self, frames: int, height: int, width: int, first_frame: int = 0, device=None) -> torch.Tensor:
        ph, pw = self.config.patch_size[1:]
        return video_grid(first_frame, frames, height // ph, width // pw, device)

    def embed_sink(self, ref: torch.Tensor, motion: torch.Tensor):
        """Reference latent [B, C, 1, H, W] and motion latents [B, C, T_m, H, W] ->
        (tokens [B, N, dim] with their mask embeddings added, positions [N, 3])."""
        ph, pw = self.config.patch_size[1:]
        height, width = ref.shape[-2:]
        ref_tokens = self.patch_embedding(ref.to(self.dtype)).flatten(2).transpose(1, 2)
        motion_tokens = self.frame_packer(motion)
        tokens = torch.cat(
            [
                ref_tokens + self.trainable_cond_mask.weight[REFERENCE],
                motion_tokens + self.trainable_cond_mask.weight[MOTION],
            ],
            dim=1,
        )
        positions = torch.cat(
            [
                grid_positions([self.config.ref_rope_index], np.arange(height // ph), np.arange(width // pw)),
                self.frame_packer.positions(height, width),
            ]
        )
        return tokens, positions

    # -- transformer ----------------------------------------------------------------------------
    def run_blocks(self, x, modulation, segments, rope, context, audio, video_tokens, kv_hook=None):
        """Runs every block (and the audio injectors after theirs) on the token sequence.

        `audio` = (global, local) tokens with one row per latent frame of the first
        `video_tokens` tokens, or None (no injection: the sink pass); `kv_hook(layer_index)`
        returns that layer's key/value callable (see `SelfAttention`) or None; `segments`:
        the lengths of the parts of x that `modulation` has one row each for.
        """
        ids = segment_ids(segments, x.device)
        for index, block in enumerate(self.blocks):
            kv = kv_hook(index) if kv_hook is not None else None
            x = block(x, modulation, ids, rope, context, kv)
            if audio is not None and index in self.injector_after:
                audio_global, audio_local = audio
                residual = self.audio_injector(
                    self.injector_after[index], x[:, :video_tokens], audio_local, audio_global
                )
                if torch.is_grad_enabled():  # training: the injector's backward reads x as it was
                    x = torch.cat([x[:, :video_tokens] + residual.float(), x[:, video_tokens:]], dim=1)
                else:  # x is this block's fresh output: adding in place spares a copy of the stream.
                    x[:, :video_tokens] += residual.float()
        return x

    def unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """[B, F*H'*W', p*q*r*C] -> [B, C, F, H, W]."""
        p, q, r = self.config.patch_size
        grid = (frames // p, height // q, width // r)
        x = x.reshape(x.shape[0], *grid, p, q, r, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.config.out_dim, frames, height, width)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: list[torch.Tensor] | torch.Tensor,
        ref: torch.Tensor,
        motion: torch.Tensor,
        audio: torch.Tensor,
        cond: torch.Tensor | None = None,
        kv_hook=None,
    ) -> torch.Tensor:
        """One Wan2.2-S2V denoising call, as the official `WanModel_S2V.forward`.

        latents [B, 16, F, H, W]; timestep [B] (or [1]); context: text embeddings; ref
        [B, 16, 1, H, W]; motion [B, 16, T_m, H, W] (19 latents of 73 frames); audio
        [B, 25, audio_dim, 4F]. Returns the predicted flow [B, 16, F, H, W] in float32.
        `kv_hook`: see `run_blocks`.
        """
        with self.running():
            batch, _, frames, height, width = latents.shape
            device = latents.device
            video = self.embed_video(latents, cond) + self.trainable_cond_mask.weight[VIDEO]
            sink, sink_positions = self.embed_sink(ref, motion)
            x = torch.cat([video, sink], dim=1).float()
            positions = torch.cat(
                [self.video_positions(frames, height, width, device=device), sink_positions.to(device)]
            )
            rope = rope_cos_sin(positions, self.config.head_dim, device)

            times = torch.cat([timestep.flatten().expand(batch), timestep.new_zeros(1)]).to(device)
            head_emb, modulation = self.embed_time(times)
            modulation = torch.stack([modulation[:batch], modulation[-1:].expand(batch, -1, -1)], dim=1)
            segments = [video.shape[1], sink.shape[1]]

            x = self.run_blocks(
                x,
                modulation,
                segments,
                rope,
                self.embed_text(context),
                self.embed_audio(audio),
                video.shape[1],
                kv_hook,
            )
            out = self.head(x[:, : video.shape[1]], head_emb[:batch, None], [video.shape[1]])
            return self.unpatchify(out.float(), frames, height, width)
