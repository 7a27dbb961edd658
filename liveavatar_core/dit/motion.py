"""Frame packing of the motion context: the latest motion latents at full resolution, older
ones at 2x and 4x coarser patches, so 19 latent frames cost few tokens."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .rope import grid_positions, sampled_axis


class FramePacker(nn.Module):
    """Packs [B, C, T_m, H, W] motion latents into tokens with their RoPE positions.

    Buckets (1, 2, 16): the newest frame with the DiT's own patch size, the 2 before it with
    2x2x2-times larger patches, the 16 before those with 4x4x4-times larger ones. Fewer
    frames than 19 are zero-padded at the old end.
    """

    def __init__(self, dim: int, in_dim: int = 16, buckets: tuple[int, int, int] = (1, 2, 16)):
        super().__init__()
        self.buckets = tuple(buckets)
        self.in_dim = in_dim
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        total = sum(self.buckets)
        batch, _, frames, height, width = motion.shape
        padded = motion.new_zeros(batch, self.in_dim, total, height, width)
        kept = min(total, frames)
        if kept:
            padded[:, :, -kept:] = motion[:, :, -kept:]
        oldest, older, newest = padded.split(self.buckets[::-1], dim=2)
        tokens = [
            proj(part.to(proj.weight.dtype)).flatten(2).transpose(1, 2)
            for proj, part in ((self.proj, newest), (self.proj_2x, older), (self.proj_4x, oldest))
        ]
        return torch.cat(tokens, dim=1)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """RoPE positions [tokens, 3] of `forward`'s output for a latent of `height` x `width`.

        Temporal positions are negative (the past): -1 for the newest frame, -3 for the 2x
        bucket, and four positions spread over -19..-4 for the 4x bucket. Spatially, coarse
        patches are spread over the fine grid of the video tokens.
        """
        fine_h, fine_w = height // 2, width // 2
        parts, reach = [], 0
        for scale, span in zip((1, 2, 4), self.buckets):
            reach += span
            count = span // scale
            # Spread over the bucket's frames, newest last: e.g. 4x bucket -> -19, -14, -9, -4.
            t = -np.linspace(reach, reach - span + 1, count).astype(int)
            h = sampled_axis(0, fine_h, fine_h // scale)
            w = sampled_axis(0, fine_w, fine_w // scale)
            parts.append(grid_positions(t, h, w))
        return torch.cat(parts, dim=0)
