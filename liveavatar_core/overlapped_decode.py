"""Decoding block b while the DiT denoises block b + 1.

The VAE decode of a block is many small kernels launched from a Python loop; run in line, the
GPU idles while Python works through it and the DiT waits for it. Here each block's decode runs
on a worker thread with a CUDA stream of its own, started as soon as the block's latents are
ready (an event orders the two streams), while the main thread goes on to the next block.
Chunks still come out in block order; at most `max_pending` decodes wait, so memory stays flat.
With `overlap=False` (the default) every block is decoded in line.

Measured on one H200 at 688*368 (fp8 DiT, no writer): 0.97x the in-line speed, with 5.5 GiB
more reserved, because the DiT already keeps the GPU busy; kept as an option for GPUs
where the decode leaves the device idle, and as the place to build finer overlap.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class DecodeQueue:
    """Feeds clean block latents to `decode(clip, block, latents) -> chunk | None` in order."""

    def __init__(self, decode, device: torch.device, overlap: bool, max_pending: int = 1):
        self._decode = decode
        self.overlap = overlap
        self.max_pending = max_pending
        self._stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="liveavatar-decode") if overlap else None
        self._pending: deque[Future] = deque()
        # Grad and inference modes are per thread: the worker takes the caller's.
        self._inference = torch.is_inference_mode_enabled()

    def submit(self, clip: int, block: int, latents: torch.Tensor) -> Iterator:
        """Queues one block; yields the chunks of the blocks whose decode has finished."""
        if not self.overlap:
            chunk = self._decode(clip, block, latents)
            if chunk is not None:
                yield chunk
            return
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record()
            latents.record_stream(self._stream)  # the allocator must not reuse it before the decode ran
        self._pending.append(self._executor.submit(self._run, clip, block, latents, ready))
        yield from self._collect(keep=self.max_pending)

    def drain(self) -> Iterator:
        """Yields every pending chunk; afterwards the caller's stream sees all decoded tensors."""
        yield from self._collect(keep=0)
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    def _collect(self, keep: int) -> Iterator:
        while self._pending and (self._pending[0].done() or len(self._pending) > keep):
            chunk = self._pending.popleft().result()
            if chunk is not None:
                yield chunk

    def _run(self, clip, block, latents, ready):
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with torch.inference_mode(self._inference), torch.no_grad(), stream:
            if ready is not None:
                self._stream.wait_event(ready)
            return self._decode(clip, block, latents)

    def close(self) -> None:
        """Waits for decodes under way (their chunks are dropped: call `drain` to keep them)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._pending.clear()

    def __enter__(self) -> DecodeQueue:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
