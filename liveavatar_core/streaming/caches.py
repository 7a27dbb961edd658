"""Key/value caches of causal block generation.

- `BlockKVCache`: per layer, the RoPE-rotated keys and values of the latest frames (a ring
  buffer holding one clip's worth of latent frames). LiveAvatar keeps one such cache per
  denoising step, filled at that step's noise level; we do the same for any step count.
- `SinkCache`: per layer, the keys (not yet rotated) and values of the reference and motion
  tokens, computed once by a prefill pass at timestep 0 and shared by every step. The keys
  are rotated at each use because the reference frame's position rolls with generation.
"""

from __future__ import annotations

import torch

from ..dit.rope import apply_rope


class BlockKVCache:
    def __init__(self, num_layers: int, frames: int, tokens_per_frame: int):
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._slots: tuple[tuple, torch.Tensor] | None = None  # every layer of a call writes the same slots

    def token_slots(self, first_frame: int, frames: int, device) -> torch.Tensor:
        """Ring indices of the tokens of frames [first_frame, first_frame + frames)."""
        key = (first_frame, frames, torch.device(device))
        if self._slots is None or self._slots[0] != key:
            starts = (torch.arange(first_frame, first_frame + frames, device=device) % self.frames) * self.tokens_per_frame
            tokens = starts[:, None] + torch.arange(self.tokens_per_frame, device=device)[None]
            self._slots = key, tokens.flatten()
        return self._slots[1]

    def write_and_read(self, layer: int, first_frame: int, frames: int, keys: torch.Tensor, values: torch.Tensor):
        """Stores a block's keys/values and returns every cached frame's (block included).

        Blocks arrive in order from frame 0, so the filled slots are always the first
        min(ring size, frames so far) ones."""
        if self.keys[layer] is None:
            shape = (keys.shape[0], self.frames * self.tokens_per_frame, *keys.shape[2:])
            self.keys[layer] = keys.new_zeros(shape)
            self.values[layer] = values.new_zeros(shape)
        slots = self.token_slots(first_frame, frames, keys.device)
        self.keys[layer].index_copy_(1, slots, keys.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(1, slots, values.to(self.values[layer].dtype))
        used = min(self.frames, first_frame + frames) * self.tokens_per_frame
        return self.keys[layer][:, :used], self.values[layer][:, :used]


class SinkCache:
    def __init__(self, num_layers: int):
        self.raw_keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # [tokens, 3] at the prefill (ref at its base index)
        self.ref_tokens = 0

    def store(self, layer: int, raw_keys: torch.Tensor, values: torch.Tensor) -> None:
        self.raw_keys[layer], self.values[layer] = raw_keys, values

    def rotated(self, layer: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(self.raw_keys[layer], rope), self.values[layer]
