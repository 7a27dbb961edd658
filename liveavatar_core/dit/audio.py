"""The DiT's audio path: a causal encoder of wav2vec2 features and the per-frame injectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNorm
from einops import rearrange
from torch import nn

from .layers import CrossAttention


class CausalConv1d(nn.Module):
    """Conv1d that only looks back in time (left padding by edge replication)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


class AudioMotionEncoder(nn.Module):
    """Turns per-frame audio features into `num_token` local tokens (+1 learned padding token)
    and one global token per 4x-downsampled step (the AdaIN input of the injectors)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_token: int):
        super().__init__()
        self.num_token = num_token
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_token, 3)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C/4, T] after the first conv -> [N, T/4, C]: norm/SiLU around two strided convs."""
        for conv in (None, self.conv2, self.conv3):
            if conv is not None:
                x = conv(x)
            x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        return x.transpose(1, 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, in_dim] -> (global [B, T', 1, C], local [B, T', num_token + 1, C])."""
        x = features.transpose(1, 2)
        batch = x.shape[0]
        local = rearrange(self.conv1_local(x), "b (n c) t -> (b n) c t", n=self.num_token)
        local = rearrange(self._downsample(local), "(b n) t c -> b t n c", b=batch)
        padding = self.padding_tokens.expand(batch, local.shape[1], 1, -1)
        local = torch.cat([local, padding.to(local.dtype)], dim=2)
        glob = self.final_linear(self._downsample(self.conv1_global(x)))
        return glob.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Learned softmax-free weighting of the wav2vec2 layers, then `AudioMotionEncoder`."""

    def __init__(self, audio_dim: int, out_dim: int, num_layers: int = 25, num_token: int = 4):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = AudioMotionEncoder(audio_dim, out_dim, num_token)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, layers, audio_dim, T] float features -> (global, local) tokens per audio step."""
        weights = F.silu(self.weights.float())
        mixed = (features.float() * weights / weights.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(mixed.transpose(1, 2).to(self.weights.dtype))


class AudioInjector(nn.Module):
    """Cross-attention from each latent frame's video tokens to that frame's audio tokens,
    after selected DiT blocks; the query side is AdaIN-normalised by the global audio token."""

    def __init__(self, dim: int, num_heads: int, num_injectors: int, eps: float = 1e-6):
        super().__init__()
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps) for _ in range(num_injectors))
        self.injector_adain_layers = nn.ModuleList(
            AdaLayerNorm(output_dim=dim * 2, embedding_dim=dim, chunk_dim=1) for _ in range(num_injectors)
        )

    def forward(self, index: int, video: torch.Tensor, audio_local: torch.Tensor, audio_global: torch.Tensor):
        """video [B, F*HW, C] -> residual [B, F*HW, C]; audio_* are [B, F, n, C] (one row per frame)."""
        frames = audio_local.shape[1]
        per_frame = rearrange(video, "b (t n) c -> (b t) n c", t=frames)
        temb = rearrange(audio_global, "b t n c -> (b t) n c")[:, 0]
        adain = self.injector_adain_layers[index]
        dtype = self.injector[index].dtype
        query = adain(per_frame.to(dtype), temb=temb.to(dtype))
        out = self.injector[index](query, rearrange(audio_local, "b t n c -> (b t) n c"))
        return rearrange(out, "(b t) n c -> b (t n) c", t=frames)
