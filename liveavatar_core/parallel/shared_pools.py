"""One warm `WorkerPool` per process, for hosts that make video after video (the ComfyUI nodes).

Starting the workers and loading the networks on every GPU takes long (minutes for the 14B
model), so the pool outlives a run: the next run with the same model files, process count
and device reuses its workers and their loaded networks. The GPUs hold one pool's networks at
a time, so asking for other files or another count shuts the old pool down before the new one
starts; `release_shared_pool()` frees the GPUs for a run in this process, and the
interpreter's exit ends the last pool.
"""

from __future__ import annotations

import atexit
import threading

import torch

from .group import resolve_device_kind
from .models import ModelSource
from .pool import WorkerPool

_lock = threading.Lock()
_pool: WorkerPool | None = None
_key: tuple | None = None


def shared_pool(models: ModelSource, world_size: int, device: str = "auto") -> WorkerPool:
    """The warm pool for (models, world_size, device), made (not yet started) when it differs
    from the current one, which is shut down first. Raises InputError when the machine has
    fewer GPUs than `world_size`."""
    global _pool, _key
    kind = resolve_device_kind(device, world_size)
    # CPU workers share out this process's threads (one each when it has one, as in tests).
    cpu_threads = max(1, torch.get_num_threads() // world_size) if kind == "cpu" else None
    stamp = models.stamp() if hasattr(models, "stamp") else None  # files replaced on disk: fresh workers
    key = (models, stamp, world_size, kind, cpu_threads)
    with _lock:
        if _pool is not None and _key == key:
            return _pool
        _shut_down_current()
        _pool = WorkerPool(world_size, models, kind, cpu_threads=cpu_threads, run_main_script=False)
        _key = key
        return _pool


def release_shared_pool() -> None:
    """Ends the warm pool's workers, if any (their GPUs' memory is free afterwards)."""
    with _lock:
        _shut_down_current()


def _shut_down_current() -> None:
    global _pool, _key
    pool, _pool, _key = _pool, None, None
    if pool is not None:
        pool.shutdown()


atexit.register(release_shared_pool)
