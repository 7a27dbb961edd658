"""The loop of one pool worker process: join the group, then run jobs until told to stop.

Each worker reads `RunRequest`s (or `Shutdown`) from its own queue; everything the parent needs
to hear goes through one events queue: `Ready`, `Chunk` (decoding rank only), `Done` and
`Failed`. After a failure the worker exits: its neighbours are blocked on it, and only a
closed link frees them.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DistributedError
from ..run_spec import RunSpec
from ..semantics import FrameChunk
from ..streaming import GenerationCancelled
from .group import join, leave, rank_device
from .models import ModelSource, RankModels
from .plan import plan_stages
from .stage import run_stage

POLL_S = 1.0
EXIT_PARENT_GONE = 3


@dataclass(frozen=True)
class RunRequest:
    job_id: int
    spec: RunSpec


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    rank: int


@dataclass(frozen=True)
class Chunk:
    """A block's frames, as a numpy array (cheaper through the queue than a tensor)."""

    job_id: int
    clip: int
    block: int
    frames: np.ndarray
    ends_clip: bool

    def frame_chunk(self) -> FrameChunk:
        return FrameChunk(self.clip, self.block, torch.from_numpy(self.frames), self.ends_clip)


@dataclass(frozen=True)
class Done:
    job_id: int
    rank: int
    cancelled: bool


@dataclass(frozen=True)
class Failed:
    job_id: int | None  # None: while starting
    rank: int
    error: BaseException
    trace: str


def worker_main(
    rank: int,
    world_size: int,
    device_kind: str,
    store_port: int,
    source: ModelSource,
    jobs,
    events,
    stop,
    join_timeout_s: float,
    cpu_threads: int | None,
) -> None:
    exit_with_parent()
    if device_kind == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        device = rank_device(device_kind, rank)
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=join_timeout_s))

        def stuck(message):
            events.put(Failed(None, rank, DistributedError(message), ""))
            _flush(events)

        join(rank, world_size, device, store, join_timeout_s, on_stuck=stuck)
    except BaseException as err:
        _fail(events, None, rank, err)
    events.put(Ready(rank))
    models = RankModels(source, device)
    while (request := _next_request(jobs)) is not None:
        job_id, spec = request.job_id, request.spec
        try:
            should_stop = stop.is_set if rank == 0 else None
            plan = plan_stages(world_size, spec.settings.sample_steps)
            for chunk in run_stage(spec, plan, rank, device, models, should_stop):
                events.put(Chunk(job_id, chunk.clip, chunk.block, chunk.frames.numpy(), chunk.ends_clip))
            events.put(Done(job_id, rank, False))
        except GenerationCancelled:
            events.put(Done(job_id, rank, True))
        except BaseException as err:
            _fail(events, job_id, rank, err)
    leave()
    # Nothing is left to save: skipping the interpreter's teardown of torch saves seconds.
    _flush(events)
    os._exit(0)


def exit_with_parent() -> None:
    """Ends this worker as soon as the process that started it is gone (killed, crashed), even
    in the middle of a job or a join: otherwise it would hold its memory (GPU memory on GPUs)
    with nobody left to use it. The parent's sentinel is a pipe that closes when it dies, also
    under forkserver, where the OS parent is the fork server."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="liveavatar-parent-watchdog", daemon=True).start()


def _next_request(jobs) -> RunRequest | None:
    """The next run, or None on shutdown or when the parent process is gone."""
    while True:
        try:
            request = jobs.get(timeout=POLL_S)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return None
            continue
        return None if isinstance(request, Shutdown) else request


def _fail(events, job_id, rank: int, err: BaseException) -> None:
    events.put(Failed(job_id, rank, _portable(err), traceback.format_exc()))
    _flush(events)
    os._exit(1)


def _flush(events) -> None:
    events.close()
    events.join_thread()


def _portable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling (our errors do), else its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
