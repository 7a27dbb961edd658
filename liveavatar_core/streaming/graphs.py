"""CUDA graphs of streaming DiT calls: each call's thousands of kernels replayed in one launch.

At 14B size one block step launches several thousand kernels; eagerly the host cannot queue
them as fast as the GPU runs them, so the GPU waits. Once the ring of a step's cache is full,
a call's shapes depend only on where the block sits in the ring, so one graph per (cache,
ring position, block length) is captured and replayed for every later clip; what changes
from clip to clip (latents, timestep, RoPE positions, audio, text) is copied into the graph's
input tensors before each replay.

A graph reads every other tensor by address: the cache's rings and slots, the sink and the
weights. The caches keep their storage for their whole life (see `caches`), graphs live and
die with their cache, and a graph is dropped when the weights it saw are replaced.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    keep: tuple  # objects the graph reads by address (the sink)
    weights: tuple[int, ...]


class BlockGraphs:
    """Captures and replays `fn(*tensors)` per key; `fn` must launch only device work whose
    shapes are fixed by the key, and read nothing but `tensors` and long-lived buffers."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner (cache) -> {key: _Graph}
        self._pool = None
        self.failed: str | None = None  # why capturing was given up, if it was

    def _weights(self) -> tuple[int, ...]:
        # A LoRA merge or an fp8 swap replaces weight tensors; checking a few addresses is cheap.
        params = list(self._model.parameters())
        return tuple(p.data_ptr() for p in (params[0], params[len(params) // 2], params[-1]))

    def run(
        self, owner, key, fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], keep=()
    ) -> torch.Tensor:
        graphs = self._graphs.setdefault(owner, {})
        entry = graphs.get(key)
        if entry is not None and entry.weights != self._weights():
            graphs.clear()
            entry = None
        if entry is None:
            entry = self._capture(fn, tensors, keep)
            if entry is None:
                return fn(*tensors)
            graphs[key] = entry
        for static, value in zip(entry.inputs, tensors, strict=True):
            static.copy_(value)
        entry.graph.replay()
        return entry.output.clone()  # the next replay overwrites the graph's output

    def _capture(self, fn, tensors, keep) -> _Graph | None:
        if self.failed is not None:
            return None
        inputs = tuple(t.clone() for t in tensors)
        # One eager run on a side stream first, as CUDA graph capture asks: it compiles, picks
        # kernels and makes the handles that capture may not create.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (a video writer, an overlapped decode) may keep using CUDA.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = fn(*inputs)
        except Exception as error:  # some kernel or op could not be captured: run eagerly from now on
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("CUDA graphs of the DiT calls are off for this run: %s", self.failed)
            return None
        return _Graph(graph, inputs, output, tuple(keep), self._weights())

    def count(self) -> int:
        return sum(len(graphs) for graphs in self._graphs.values())
