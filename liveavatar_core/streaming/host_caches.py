"""Block KV caches kept in host memory, for GPUs too small to hold them (the low-VRAM mode).

At 688*368 the per-step caches of one run take 38 GiB in bf16, more than the 14B model
itself in fp8. Here every ring buffer lives in pinned host RAM; the GPU holds only
`depth` staging rings shared by every cache. While layer L attends, the ring of layer L + 1
is already being copied in on a copy stream of its own, and each block's fresh keys/values
are copied back out on a third stream, so transfers overlap the DiT's work. The numbers are
those of `BlockKVCache`: the same keys and values are read, only their home differs.
Measured on one H200 at 688*368 with the fp8 DiT: 0.98x the speed of caches on the GPU,
21.5 GiB device peak instead of 57.3, frames bit-equal.

On the CPU (no CUDA) the same code runs with plain copies, which is what the tests check.
"""

from __future__ import annotations

import torch

from .caches import BlockKVCache


class _Transfer:
    """A copy stream (CUDA) or nothing (CPU: copies happen in line)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def after_current(self):
        """A context running on this stream once the caller's queued work is done."""
        if self.stream is None:
            return _Inline()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def done_event(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


class _Inline:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def _wait(event, stream=None) -> None:
    if event is not None:
        (stream or torch.cuda.current_stream()).wait_event(event)


class KVStager:
    """The device side of every `HostKVCache` of a run: staging rings and copy streams.

    Only one layer of one DiT call attends at a time, so `depth` rings (the one in use and
    the ones being filled ahead) serve all steps, branches and layers."""

    def __init__(self, device: torch.device | str, depth: int = 2):
        if depth < 2:
            raise ValueError("KVStager needs at least 2 staging rings (one in use, one filling)")
        self.device = torch.device(device)
        self.depth = depth
        self._rings: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._staged: list[tuple | None] = []  # per ring: (cache id, layer, call) it holds or is filling
        self._ready: list = []  # per ring: event after its fill
        self._drained: list = []  # per ring: event after its latest write-back read it
        self._next = 0
        self._h2d = _Transfer(self.device)
        self._d2h = _Transfer(self.device)

    def _ring_for(self, key, like: torch.Tensor) -> int:
        if not self._rings:
            for _ in range(self.depth):
                self._rings.append(
                    (torch.empty_like(like, device=self.device), torch.empty_like(like, device=self.device))
                )
            self._staged = [None] * self.depth
            self._ready = [None] * self.depth
            self._drained = [None] * self.depth
        if key in self._staged:
            return self._staged.index(key)
        ring = self._next
        self._next = (self._next + 1) % self.depth
        self._staged[ring] = None
        return ring

    def stage(self, cache: HostKVCache, layer: int, call: int, regions: list[tuple[int, int]]) -> int:
        """Starts copying token ranges `regions` of `cache`'s ring of `layer` into a staging
        ring for DiT call `call` (no-op when already there or on its way); returns its index.

        The ring it overwrites was last read by work the caller has already queued and by
        its write-back, so the copy waits for both."""
        key = (id(cache), layer, call)
        ring = self._ring_for(key, cache.keys[layer])
        if self._staged[ring] == key:
            return ring
        keys, values = self._rings[ring]
        with self._h2d.after_current():
            _wait(self._drained[ring], self._h2d.stream)
            _wait(cache.written[layer], self._h2d.stream)  # the previous block's write-back
            for start, end in regions:
                keys[:, start:end].copy_(cache.keys[layer][:, start:end], non_blocking=True)
                values[:, start:end].copy_(cache.values[layer][:, start:end], non_blocking=True)
        self._staged[ring] = key
        self._ready[ring] = self._h2d.done_event()
        return ring

    def use(self, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The staging ring, once its fill has landed (the caller's stream waits for it)."""
        _wait(self._ready[ring])
        return self._rings[ring]

    def write_back(self, cache: HostKVCache, layer: int, ring: int, start: int, end: int):
        """Copies tokens [start, end) of a staging ring (just written by the caller) home."""
        keys, values = self._rings[ring]
        with self._d2h.after_current():
            cache.keys[layer][:, start:end].copy_(keys[:, start:end], non_blocking=True)
            cache.values[layer][:, start:end].copy_(values[:, start:end], non_blocking=True)
        self._drained[ring] = self._d2h.done_event()
        return self._drained[ring]

    def finish(self) -> None:
        """Orders the caller's later work after every copy in flight, so the staging rings can
        be freed and reused safely."""
        for transfer in (self._h2d, self._d2h):
            if transfer.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(transfer.stream)


class HostKVCache(BlockKVCache):
    """`BlockKVCache` whose rings live in host memory (see the module docstring)."""

    reads_sink_in_place = False  # the staging rings hold no sink: DiT calls concatenate it

    def __init__(self, num_layers: int, frames: int, tokens_per_frame: int, stager: KVStager):
        super().__init__(num_layers, frames, tokens_per_frame)
        self.stager = stager
        self.written: list = [None] * num_layers  # per layer: event after its latest write-back

    def write_and_read(self, layer: int, first_frame: int, frames: int, keys: torch.Tensor, values: torch.Tensor):
        if self.keys[layer] is None:
            shape = (keys.shape[0], self.frames * self.tokens_per_frame, *keys.shape[2:])
            pin = self.stager.device.type == "cuda"
            self.keys[layer] = torch.empty(shape, dtype=keys.dtype, pin_memory=pin)
            self.values[layer] = torch.empty(shape, dtype=values.dtype, pin_memory=pin)
        # Clips start at ring slot 0 and blocks tile a clip, so a block's slots are contiguous.
        start = (first_frame % self.frames) * self.tokens_per_frame
        end = start + frames * self.tokens_per_frame
        if end > self.frames * self.tokens_per_frame:
            raise ValueError(f"a block of {frames} frames from frame {first_frame} wraps around the ring")
        filled = min(self.frames, first_frame - self.origin) * self.tokens_per_frame
        used = self.held_frames(first_frame, frames) * self.tokens_per_frame
        # What earlier blocks left, less the slots this block is about to overwrite.
        regions = [(a, b) for a, b in ((0, min(start, filled)), (end, filled)) if b > a]
        ring = self.stager.stage(self, layer, first_frame, regions)
        if layer + 1 < len(self.keys) and self.keys[layer + 1] is not None:
            self.stager.stage(self, layer + 1, first_frame, regions)  # the next layer's, while this one works
        ring_keys, ring_values = self.stager.use(ring)
        ring_keys[:, start:end].copy_(keys.to(ring_keys.dtype))
        ring_values[:, start:end].copy_(values.to(ring_values.dtype))
        self.written[layer] = self.stager.write_back(self, layer, ring, start, end)
        return ring_keys[:, :used], ring_values[:, :used]
