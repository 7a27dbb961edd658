"""Key/value caches of causal block generation.

- `BlockKVCache`: per layer, the RoPE-rotated keys and values of the latest frames (a ring
  buffer holding one clip's worth of latent frames). LiveAvatar keeps one such cache per
  denoising step, filled at that step's noise level; we do the same for any step count.
- `SinkCache`: per layer, the keys (not yet rotated) and values of the reference and motion
  tokens, computed once by a prefill pass at timestep 0 and shared by every step. The keys
  are rotated at each use because the reference frame's position rolls with generation.

`BlockKVCache.write_and_read_with_sink` keeps each layer's ring behind a slot for the sink in
one buffer, [sink | ring], so a DiT call attends to one slice of it instead of a fresh
concatenation of ring and sink (two copies of every cached key and value per layer).
Attention does not depend on the order of the keys, so both give the same output up to
rounding.

`Fp8BlockKVCache` and `Fp8SinkCache` keep the same keys and values in e4m3 with a scale per
token and head: half the memory, read back dequantised (an option, off by default). With fp8
attention (`dit.attention`'s "fa3-fp8"), `Fp8HeadKVCache` takes the ring's place: e4m3 with
one fixed scale per layer and head, read by the attention as it lies (no dequantised copy).

Tensors here keep their storage from call to call (slots are remembered per ring position,
a refilled sink is copied into the old one): a captured CUDA graph of a DiT call reads them
by address.
"""

from __future__ import annotations

import torch

from ..dit import fused
from ..dit.fp8_attention import Fp8Heads, head_scales, quantize_with
from ..dit.rope import apply_rope


class BlockKVCache:
    reads_sink_in_place = True  # has `write_and_read_with_sink`
    keeps_sink_slot = False  # True: read only with `write_and_read_with_sink`, whatever `sink_in_place` says

    def __init__(self, num_layers: int, frames: int, tokens_per_frame: int):
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        # The first frame this ring is given: 0, or a resumed run's first replayed frame (the
        # ring holds nothing from before it, so nothing before it is read).
        self.origin = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # the rings
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # Per layer, with the sink: [sink | ring] buffers; keys/values are then views of their rings.
        self._joint: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._slots: dict[tuple, torch.Tensor] = {}  # every layer of a call writes the same slots

    def token_slots(self, first_frame: int, frames: int, device) -> torch.Tensor:
        """Ring indices of the tokens of frames [first_frame, first_frame + frames)."""
        key = (first_frame % self.frames, frames, torch.device(device))
        if key not in self._slots:
            starts = (
                torch.arange(first_frame, first_frame + frames, device=device) % self.frames
            ) * self.tokens_per_frame
            tokens = starts[:, None] + torch.arange(self.tokens_per_frame, device=device)[None]
            self._slots[key] = tokens.flatten()
        return self._slots[key]

    def held_frames(self, first_frame: int, frames: int) -> int:
        """Frames the ring holds once the block at `first_frame` is written."""
        return min(self.frames, first_frame + frames - self.origin)

    def _ring_shape(self, keys: torch.Tensor) -> tuple[int, ...]:
        return (keys.shape[0], self.frames * self.tokens_per_frame, *keys.shape[2:])

    def _write(self, layer: int, first_frame: int, frames: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Stores a block's keys/values in the ring; returns how many ring tokens are filled.

        Blocks arrive in order from frame `origin` (a clip's first frame: ring slot 0), so
        the filled slots are always the first min(ring size, frames so far) ones."""
        slots = self.token_slots(first_frame, frames, keys.device)
        self.keys[layer].index_copy_(1, slots, keys.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(1, slots, values.to(self.values[layer].dtype))
        return self.held_frames(first_frame, frames) * self.tokens_per_frame

    def write_and_read(self, layer: int, first_frame: int, frames: int, keys: torch.Tensor, values: torch.Tensor):
        """Stores a block's keys/values and returns every cached frame's (block included)."""
        if self.keys[layer] is None:
            self.keys[layer] = keys.new_zeros(self._ring_shape(keys))
            self.values[layer] = values.new_zeros(self._ring_shape(values))
        used = self._write(layer, first_frame, frames, keys, values)
        return self.keys[layer][:, :used], self.values[layer][:, :used]

    def write_and_read_with_sink(
        self,
        layer: int,
        first_frame: int,
        frames: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        sink_keys: torch.Tensor,
        sink_values: torch.Tensor,
    ):
        """As `write_and_read`, followed by the sink's keys/values, but returned as
        [sink | cached frames]: slices of one buffer, no concatenation."""
        sink = sink_keys.shape[1]
        joint = self._joint[layer]
        if joint is None or joint[0].shape[1] != sink + self.frames * self.tokens_per_frame:
            if self.keys[layer] is not None and joint is None:
                raise RuntimeError("this cache was filled without the sink; read it with write_and_read")
            shape = list(self._ring_shape(keys))
            shape[1] += sink
            joint = keys.new_zeros(shape), values.new_zeros(shape)
            if self.keys[layer] is not None:  # the sink changed size: keep the ring
                joint[0][:, sink:].copy_(self.keys[layer])
                joint[1][:, sink:].copy_(self.values[layer])
            self._joint[layer] = joint
            self.keys[layer], self.values[layer] = joint[0][:, sink:], joint[1][:, sink:]
        joint_keys, joint_values = joint
        used = self._write(layer, first_frame, frames, keys, values)
        joint_keys[:, :sink].copy_(sink_keys)
        joint_values[:, :sink].copy_(sink_values)
        return joint_keys[:, : sink + used], joint_values[:, : sink + used]


class SinkCache:
    def __init__(self, num_layers: int):
        self.raw_keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # [tokens, 3] at the prefill (ref at its base index)
        self.ref_tokens = 0

    def store(self, layer: int, raw_keys: torch.Tensor, values: torch.Tensor) -> None:
        old_keys, old_values = self.raw_keys[layer], self.values[layer]
        if old_keys is not None and old_keys.shape == raw_keys.shape and old_keys.dtype == raw_keys.dtype:
            old_keys.copy_(raw_keys)  # in place: a captured DiT call reads the sink by address
            old_values.copy_(values)
        else:
            self.raw_keys[layer], self.values[layer] = raw_keys, values

    def rotated(self, layer: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(self.raw_keys[layer], rope), self.values[layer]


# -- e4m3 caches -----------------------------------------------------------------------------------
# One scale per token and head (amax over head_dim / 448): a block's keys are quantised as they
# are written, whatever the ring held before, and an outlier head spoils no other. The scales
# cost 4 bytes per 128 e4m3 values, so the caches take 52% of their bf16 size.
def _quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / fused.FP8_MAX
    return (x.float() / scale).clamp(-fused.FP8_MAX, fused.FP8_MAX).to(fused.FP8), scale


def _dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x8.float() * scale).to(dtype)


def _dequantize_behind(first: torch.Tensor, x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # [first | dequantised ring] in one pass: the concatenation costs no extra copy.
    return torch.cat([first, (x8.float() * scale).to(first.dtype)], dim=1)


class Fp8BlockKVCache(BlockKVCache):
    """`BlockKVCache` whose rings hold e4m3 values with a float32 scale per token and head
    (about half the memory); reads return the cached frames dequantised to the keys' dtype,
    behind the sink when it is given (in one pass, so no [sink | ring] buffer is kept)."""

    def __init__(self, num_layers: int, frames: int, tokens_per_frame: int):
        super().__init__(num_layers, frames, tokens_per_frame)
        self.key_scales: list[torch.Tensor | None] = [None] * num_layers
        self.value_scales: list[torch.Tensor | None] = [None] * num_layers
        self.dtype: torch.dtype | None = None  # what reads return (the keys' dtype)

    def _write(self, layer: int, first_frame: int, frames: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        if self.keys[layer] is None:
            self.dtype = keys.dtype
            shape = self._ring_shape(keys)
            self.keys[layer] = keys.new_zeros(shape, dtype=fused.FP8)
            self.values[layer] = values.new_zeros(shape, dtype=fused.FP8)
            self.key_scales[layer] = keys.new_zeros((*shape[:-1], 1), dtype=torch.float32)
            self.value_scales[layer] = values.new_zeros((*shape[:-1], 1), dtype=torch.float32)
        slots = self.token_slots(first_frame, frames, keys.device)
        for ring, scales, x in ((self.keys, self.key_scales, keys), (self.values, self.value_scales, values)):
            x8, scale = fused.run(_quantize_heads, x)
            ring[layer].view(torch.uint8).index_copy_(1, slots, x8.view(torch.uint8))
            scales[layer].index_copy_(1, slots, scale)
        return self.held_frames(first_frame, frames) * self.tokens_per_frame

    def write_and_read(self, layer: int, first_frame: int, frames: int, keys: torch.Tensor, values: torch.Tensor):
        used = self._write(layer, first_frame, frames, keys, values)
        return (
            fused.run(_dequantize, self.keys[layer][:, :used], self.key_scales[layer][:, :used], self.dtype),
            fused.run(_dequantize, self.values[layer][:, :used], self.value_scales[layer][:, :used], self.dtype),
        )

    def write_and_read_with_sink(
        self,
        layer: int,
        first_frame: int,
        frames: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        sink_keys: torch.Tensor,
        sink_values: torch.Tensor,
    ):
        used = self._write(layer, first_frame, frames, keys, values)
        return (
            fused.run(
                _dequantize_behind,
                sink_keys.to(self.dtype),
                self.keys[layer][:, :used],
                self.key_scales[layer][:, :used],
            ),
            fused.run(
                _dequantize_behind,
                sink_values.to(self.dtype),
                self.values[layer][:, :used],
                self.value_scales[layer][:, :used],
            ),
        )


class Fp8SinkCache(SinkCache):
    """`SinkCache` holding e4m3 keys and values with a scale per token and head; `rotated`
    dequantises them (to the dtype they came in) before the keys are rotated."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.key_scales: list[torch.Tensor | None] = [None] * num_layers
        self.value_scales: list[torch.Tensor | None] = [None] * num_layers
        self.dtype: torch.dtype | None = None

    def store(self, layer: int, raw_keys: torch.Tensor, values: torch.Tensor) -> None:
        self.dtype = raw_keys.dtype
        keys8, key_scale = fused.run(_quantize_heads, raw_keys)
        values8, value_scale = fused.run(_quantize_heads, values)
        old = self.raw_keys[layer]
        if old is not None and old.shape == keys8.shape:
            for target, new in zip(
                (old, self.values[layer], self.key_scales[layer], self.value_scales[layer]),
                (keys8, values8, key_scale, value_scale),
                strict=True,
            ):
                target.copy_(new)  # in place: a captured DiT call reads the sink by address
        else:
            self.raw_keys[layer], self.values[layer] = keys8, values8
            self.key_scales[layer], self.value_scales[layer] = key_scale, value_scale

    def rotated(self, layer: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
        keys = fused.run(_dequantize, self.raw_keys[layer], self.key_scales[layer], self.dtype)
        values = fused.run(_dequantize, self.values[layer], self.value_scales[layer], self.dtype)
        return apply_rope(keys, rope), values


# -- e4m3 caches read by fp8 attention --------------------------------------------------------------
# FlashAttention-3 descales a whole key sequence with one scale per head, so the ring and the
# sink slot behind which it sits share one scale per layer and head. It is fixed at a layer's
# first write, from the amax of that block's and the sink's keys (values) times a headroom,
# and later blocks are quantised into it, saturating. Why fixed: a scale that grew with the
# data would mean requantising the whole ring (a pass over it, the copy this cache exists to
# avoid); each step has its own cache, so the timestep and with it the keys' and values'
# sizes are the same from block to block. Why the headroom costs nothing: e4m3 rounds to the
# same relative precision from 2^-6 to 448, so mapping the amax to 448 / 16 only sends values
# 1/1800 of the amax and smaller to the subnormals (on Gaussian test data the attention error
# is the same, to three digits, for headrooms 1 to 64). A resumed run's replay sets the scales
# from its first replayed block, not the run's first: it then matches the uninterrupted run to
# e4m3 rounding, not bit for bit.
HEADROOM = 16.0


class Fp8HeadKVCache(BlockKVCache):
    """`BlockKVCache` for fp8 attention: per layer one e4m3 [sink | ring] buffer with one
    float32 scale per head (fixed at the first write, see above), read as `Fp8Heads` views of
    that buffer. The sink's keys are rotated at each call, so its slot is rewritten at each
    call (in this cache's scales); the ring only takes the new block. The sink slot is always
    kept (it costs 1 byte per value, where concatenating would copy the ring at every call)."""

    keeps_sink_slot = True

    def __init__(self, num_layers: int, frames: int, tokens_per_frame: int):
        super().__init__(num_layers, frames, tokens_per_frame)
        self.key_scales: list[torch.Tensor | None] = [None] * num_layers  # [B, heads]
        self.value_scales: list[torch.Tensor | None] = [None] * num_layers

    def write_and_read(self, layer, first_frame, frames, keys, values):
        raise RuntimeError("an Fp8HeadKVCache is read with its sink: write_and_read_with_sink")

    def write_and_read_with_sink(
        self,
        layer: int,
        first_frame: int,
        frames: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        sink_keys: torch.Tensor,
        sink_values: torch.Tensor,
    ) -> tuple[Fp8Heads, Fp8Heads]:
        sink = sink_keys.shape[1]
        if self.key_scales[layer] is None:
            self.key_scales[layer] = torch.maximum(head_scales(keys), head_scales(sink_keys)) * HEADROOM
            self.value_scales[layer] = torch.maximum(head_scales(values), head_scales(sink_values)) * HEADROOM
        joint = self._joint[layer]
        if joint is None or joint[0].shape[1] != sink + self.frames * self.tokens_per_frame:
            shape = list(self._ring_shape(keys))
            shape[1] += sink
            joint = keys.new_zeros(shape, dtype=fused.FP8), values.new_zeros(shape, dtype=fused.FP8)
            if self.keys[layer] is not None:  # the sink changed size: keep the ring
                joint[0][:, sink:].view(torch.uint8).copy_(self.keys[layer].view(torch.uint8))
                joint[1][:, sink:].view(torch.uint8).copy_(self.values[layer].view(torch.uint8))
            self._joint[layer] = joint
            self.keys[layer], self.values[layer] = joint[0][:, sink:], joint[1][:, sink:]
        slots = self.token_slots(first_frame, frames, keys.device)
        used = sink + self.held_frames(first_frame, frames) * self.tokens_per_frame
        read = []
        for buffer, scale, new, sunk in (
            (joint[0], self.key_scales[layer], keys, sink_keys),
            (joint[1], self.value_scales[layer], values, sink_values),
        ):
            buffer[:, sink:].view(torch.uint8).index_copy_(1, slots, quantize_with(new, scale).view(torch.uint8))
            buffer[:, :sink].view(torch.uint8).copy_(quantize_with(sunk, scale).view(torch.uint8))
            read.append(Fp8Heads(buffer[:, :used], scale))
        return read[0], read[1]
