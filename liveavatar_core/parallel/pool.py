"""A warm pool of pipeline worker processes, driven from the caller's process.

    with WorkerPool(5, FileModels(ModelFiles(dit=dit, vae=vae, lora=lora))) as pool:
        for chunk in pool.run(RunSpec.make(image, features, context, "688*368", settings)):
            ...  # FrameChunks, as StreamingPipeline.stream yields them

Workers are started once (one per GPU, or CPU processes with gloo when there is no GPU),
load their networks on first use and keep them between runs. `stop()` (or `should_stop`)
ends a run between blocks: the blocks already under way are still delivered, then
GenerationCancelled is raised. If a worker dies or fails, the others are stopped, the frames
that arrived are still delivered, and a DistributedError names the rank; the next run starts
fresh workers.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import DistributedError, LiveAvatarError
from ..run_spec import RunSpec
from ..semantics import FrameChunk
from ..streaming import GenerationCancelled
from .group import JOIN_HINT, resolve_device_kind
from .models import ModelSource
from .worker import Chunk, Done, Failed, Ready, RunRequest, Shutdown, worker_main

POLL_S = 0.1
# Spawned workers import torch and the package before they start joining.
STARTUP_ALLOWANCE_S = 120.0
# After the first sign of failure, how long to collect what else arrives (frames, the errors
# of the other ranks) before naming the rank at fault.
FAILURE_GRACE_S = 2.0
SHUTDOWN_WAIT_S = 30.0


class WorkerPool:
    def __init__(
        self,
        world_size: int,
        models: ModelSource,
        device: str = "auto",
        join_timeout_s: float = 300.0,
        cpu_threads: int | None = None,
        drain_timeout_s: float = 600.0,
        run_main_script: bool = True,
    ):
        """world_size: worker processes (GPUs); device: 'auto', 'cuda' or 'cpu'; cpu_threads:
        torch threads per CPU worker (default: the cores shared out); drain_timeout_s: how
        long an abandoned run may take to wind down before the pool is torn down instead;
        run_main_script: whether workers first run the caller's main script, as spawned
        processes do (needed when `models` is defined there; off inside host applications)."""
        self.world_size = world_size
        self.models = models
        self.device_kind = resolve_device_kind(device, world_size)
        self.join_timeout_s = join_timeout_s
        self.cpu_threads = cpu_threads or max(1, (os.cpu_count() or 1) // world_size)
        self.drain_timeout_s = drain_timeout_s
        self.run_main_script = run_main_script
        self._procs: list = []
        self._job_id = 0
        self._busy = False
        self.idle_since = time.monotonic()  # when the last run ended (or the pool was made)

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Spawns the workers and waits until every one has joined the group."""
        if self.running:
            return
        self._teardown()
        ctx = _start_context()
        port = int(os.environ.get("MASTER_PORT", "0"))
        self._store = dist.TCPStore(
            "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=self.join_timeout_s)
        )
        self._events = ctx.Queue()
        self._stop = ctx.Event()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        with _main_script_hidden(not self.run_main_script):
            for rank in range(self.world_size):
                args = (
                    rank,
                    self.world_size,
                    self.device_kind,
                    self._store.port,
                    self.models,
                    self._jobs[rank],
                    self._events,
                    self._stop,
                    self.join_timeout_s,
                    self.cpu_threads,
                )
                process = ctx.Process(target=worker_main, args=args, name=f"liveavatar-rank{rank}", daemon=True)
                process.start()
                self._procs.append(process)
        ready, wait_s = set(), self.join_timeout_s + STARTUP_ALLOWANCE_S
        deadline = time.monotonic() + wait_s
        while len(ready) < self.world_size:
            event = self._next_event()
            if isinstance(event, Ready):
                ready.add(event.rank)
            elif isinstance(event, Failed):
                raise self._failure([event], [], "while starting")[1]
            elif self._dead():
                raise self._failure([], [], "while starting")[1]
            elif time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - ready)
                self._teardown()
                raise DistributedError(
                    f"pipeline ranks {missing} did not start and join within {wait_s:.0f} s. {JOIN_HINT}"
                )

    def shutdown(self) -> None:
        """Asks the workers to leave, then ends any that do not."""
        for jobs, process in zip(getattr(self, "_jobs", []), self._procs):
            if process.is_alive():
                jobs.put(Shutdown())
        end = time.monotonic() + SHUTDOWN_WAIT_S
        for process in self._procs:
            process.join(max(0.0, end - time.monotonic()))
        self._teardown()

    def stop(self) -> None:
        """Asks the current run to end after the blocks already started (any thread)."""
        if self._procs:
            self._stop.set()

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # -- runs ---------------------------------------------------------------------------------
    def run(self, spec: RunSpec, should_stop: Callable[[], bool] | None = None) -> Iterator[FrameChunk]:
        """Starts the workers if needed and returns an iterator of the run's FrameChunks.
        `should_stop` is polled while waiting for frames."""
        if self._busy:
            raise RuntimeError("this pool is already running a video; finish or close that iterator first")
        self.start()
        return self._stream(spec, should_stop)

    def _stream(self, spec: RunSpec, should_stop) -> Iterator[FrameChunk]:
        if self._busy:
            raise RuntimeError("this pool is already running a video; finish or close that iterator first")
        self.start()
        self._busy = True
        self._job_id += 1
        job_id = self._job_id
        done, cancelled, frames = set(), False, 0
        try:
            self._stop.clear()
            for jobs in self._jobs:
                jobs.put(RunRequest(job_id, spec))
            while len(done) < self.world_size:
                if should_stop is not None and not self._stop.is_set() and should_stop():
                    self._stop.set()
                event = self._next_event()
                if event is None:
                    if self._dead():
                        kept, error = self._failure([], [], "during the run", job_id, frames)
                        yield from kept
                        raise error
                    continue
                if isinstance(event, Chunk) and event.job_id == job_id:
                    chunk = event.frame_chunk()
                    frames += chunk.frames.shape[0]
                    yield chunk
                elif isinstance(event, Done) and event.job_id == job_id:
                    done.add(event.rank)
                    cancelled |= event.cancelled
                elif isinstance(event, Failed):
                    kept, error = self._failure([event], [], "during the run", job_id, frames)
                    yield from kept
                    raise error
            if cancelled:
                raise GenerationCancelled(f"stopped on request after {frames} frames")
        finally:
            self._busy = False
            if len(done) < self.world_size and self.running:
                self._wind_down(job_id, done)
            self.idle_since = time.monotonic()

    def _wind_down(self, job_id: int, done: set) -> None:
        """An abandoned run: stop it and wait for every rank to finish, or tear down."""
        self._stop.set()
        deadline = time.monotonic() + self.drain_timeout_s
        while len(done) < self.world_size and time.monotonic() < deadline and not self._dead():
            event = self._next_event()
            if isinstance(event, Done) and event.job_id == job_id:
                done.add(event.rank)
            elif isinstance(event, Failed):
                break
        if len(done) < self.world_size:
            self._teardown()

    # -- failures -----------------------------------------------------------------------------
    def _failure(
        self, errors: list[Failed], kept: list[FrameChunk], when: str, job_id: int | None = None, frames: int = 0
    ):
        """Collects what arrives for a moment, tears the pool down, and returns the chunks that
        arrived and the error to raise: a rank that died without a word is the cause (its
        neighbours only lost their links to it), else the first rank that reported."""
        end = time.monotonic() + FAILURE_GRACE_S
        while time.monotonic() < end:
            event = self._next_event()
            if isinstance(event, Failed):
                errors.append(event)
            elif isinstance(event, Chunk) and event.job_id == job_id:
                kept.append(event.frame_chunk())
        dead = self._dead_ranks()
        self._teardown()
        frames += sum(c.frames.shape[0] for c in kept)
        saved = f" The {frames} frames made before it were kept." if job_id is not None else ""
        reported = {e.rank for e in errors}
        silent = [(rank, code) for rank, code in dead if rank not in reported]
        if silent:
            rank, code = silent[0]
            return kept, DistributedError(
                f"pipeline rank {rank} died {_exit_reason(code)} {when}; the other ranks were stopped.{saved}"
            )
        if not errors:
            return kept, DistributedError(f"the pipeline stopped answering {when}.{saved}")
        rank, error, trace = errors[0].rank, errors[0].error, errors[0].trace
        if isinstance(error, LiveAvatarError) and not isinstance(error, DistributedError):
            return kept, error
        detail = f"{type(error).__name__}: {error}"
        message = f"pipeline rank {rank} failed {when}: {detail}; the other ranks were stopped.{saved}"
        if job_id is None and not isinstance(error, DistributedError):
            message += f" {JOIN_HINT}"
        failure = DistributedError(message)
        failure.__cause__ = error
        if trace and hasattr(failure, "add_note"):  # Python 3.11+
            failure.add_note(f"rank {rank} traceback:\n{trace}")
        return kept, failure

    def _dead(self) -> bool:
        return any(not p.is_alive() for p in self._procs)

    def _dead_ranks(self) -> list[tuple[int, int]]:
        return [(rank, p.exitcode) for rank, p in enumerate(self._procs) if p.exitcode is not None]

    def _next_event(self):
        try:
            return self._events.get(timeout=POLL_S)
        except queue.Empty:
            return None

    def _teardown(self) -> None:
        """Ends every worker this pool started and drops its queues."""
        for process in self._procs:
            if process.is_alive():
                process.terminate()
        for process in self._procs:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for q in [getattr(self, "_events", None), *getattr(self, "_jobs", [])]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._procs, self._jobs, self._events, self._store = [], [], None, None


def _start_context():
    """forkserver where the platform has one: the package is imported once, by the server, and
    every worker of every pool is forked from it, which saves seconds of imports per worker;
    spawn elsewhere. Neither forks a process that may have started CUDA."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([worker_main.__module__])
        return ctx
    return mp.get_context("spawn")


@contextlib.contextmanager
def _main_script_hidden(hide: bool):
    """Spawned and forkserver children run the parent's main script again (as __mp_main__)
    before their target, so that objects defined there unpickle. A host application's script
    must not run twice: ComfyUI's main.py would rebuild the application in every worker (its
    custom nodes' start-up scripts, a CUDA context on the first GPU). While the workers start,
    `__main__` is an empty module, which children skip."""
    if not hide:
        yield
        return
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def _exit_reason(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f"(killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"(killed by signal {-code})"
    return f"(exit code {code})"
