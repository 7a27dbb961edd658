"""One warm `WorkerPool` per process, for hosts that make video after video (the ComfyUI nodes).

Starting the workers and loading the networks on every GPU takes long (minutes for the 14B
model), so the pool outlives a run: the next run with the same model files, process count
and device reuses its workers and their loaded networks. The GPUs hold one pool's networks at
a time, so asking for other files or another count shuts the old pool down before the new one
starts; `release_shared_pool()` frees the GPUs for a run in this process, and the
interpreter's exit ends the last pool. A pool left idle for `LIVEAVATAR_WORKER_IDLE_S` seconds
(default 600; 0 = never) is ended too, so memory held for a run long past is given back.
"""

from __future__ import annotations

import atexit
import os
import threading
import time

import torch

from .group import resolve_device_kind
from .models import ModelSource
from .pool import WorkerPool

_lock = threading.Lock()
_pool: WorkerPool | None = None
_key: tuple | None = None
_watcher: threading.Thread | None = None
IDLE_CHECK_S = 5.0


def idle_timeout_s() -> float:
    try:
        return float(os.environ.get("LIVEAVATAR_WORKER_IDLE_S", "600"))
    except ValueError:
        return 600.0


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
        _start_watcher()
        if _pool is not None and _key == key:
            _pool.idle_since = time.monotonic()  # handed out for a run: not idle
            return _pool
        _shut_down_current()
        _pool = WorkerPool(world_size, models, kind, cpu_threads=cpu_threads, run_main_script=False)
        _key = key
        return _pool


def release_shared_pool() -> None:
    """Ends the warm pool's workers, if any (their GPUs' memory is free afterwards)."""
    with _lock:
        _shut_down_current()


def _start_watcher() -> None:
    global _watcher
    if _watcher is None or not _watcher.is_alive():
        _watcher = threading.Thread(target=_release_when_idle, name="liveavatar-idle-workers", daemon=True)
        _watcher.start()


def _release_when_idle() -> None:
    while True:
        time.sleep(min(IDLE_CHECK_S, max(0.1, idle_timeout_s() / 4)))
        timeout = idle_timeout_s()
        if timeout <= 0:
            continue
        with _lock:
            pool = _pool
            if pool is not None and not pool.busy and time.monotonic() - pool.idle_since > timeout:
                _shut_down_current()


def _shut_down_current() -> None:
    global _pool, _key
    pool, _pool, _key = _pool, None, None
    if pool is not None:
        pool.shutdown()


atexit.register(release_shared_pool)
