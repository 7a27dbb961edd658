"""Joining the process group: device choice, backend, and clear errors when it fails.

Each rank uses its own GPU (NCCL) when there are GPUs, the CPU (gloo) otherwise. Joining ends
with a barrier, so NCCL links are made now rather than in the middle of the first video; a
watchdog turns a join that hangs (NCCL peer-to-peer trouble, an unreachable or taken port)
into an error that says which settings help.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import InputError

DEVICE_KINDS = ("auto", "cuda", "cpu")
# Ranks wait in recv while a neighbour loads a 14B model or decodes, so operations may take
# far longer than joining does.
OPERATION_TIMEOUT_S = 3600.0

JOIN_HINT = (
    "On GPUs this is usually NCCL failing to link the GPUs: try NCCL_P2P_DISABLE=1, and "
    "NCCL_IB_DISABLE=1 on machines without InfiniBand; NCCL_DEBUG=INFO shows where it stops. "
    "If the rendezvous port is taken or blocked, set MASTER_PORT to a free port."
)


def resolve_device_kind(kind: str, world_size: int) -> str:
    """'cuda' or 'cpu' for `world_size` ranks on this machine; 'auto' takes the GPUs when
    there are any (refusing too few of them rather than falling back to the CPU)."""
    if kind not in DEVICE_KINDS:
        raise InputError(f"device must be one of {', '.join(DEVICE_KINDS)}, got {kind!r}.")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < world_size:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise InputError(
            f"{world_size} pipeline processes need {world_size} GPUs, but {count} "
            f"{'is' if count == 1 else 'are'} visible{where}. Use at most {count} processes, "
            "or make more GPUs visible."
        )
    return "cuda"


CPU_WORKERS_FLAG = "LIVEAVATAR_CPU_WORKERS"
# Each CPU worker holds its own copy of the networks: a few prove the pipeline, more only fill
# the machine's memory.
MAX_CPU_WORKERS = 4


def check_cpu_workers(processes: int) -> None:
    """CPU worker processes only make sense for tests (each is far slower than one GPU): they
    need LIVEAVATAR_CPU_WORKERS=1, and at most MAX_CPU_WORKERS of them."""
    if processes <= 1:
        return
    if os.environ.get(CPU_WORKERS_FLAG) != "1":
        raise InputError(
            f"gpus = {processes}, but no CUDA GPU is in use here (ComfyUI runs on the CPU). Set gpus to 1; "
            f"worker processes need one GPU each (CPU workers are for tests only: {CPU_WORKERS_FLAG}=1)."
        )
    if processes > MAX_CPU_WORKERS:
        raise InputError(
            f"gpus = {processes} CPU worker processes: at most {MAX_CPU_WORKERS} run on the CPU "
            f"(they are for tests, each holds a copy of the models). Set gpus to at most "
            f"{MAX_CPU_WORKERS}, or to 1."
        )


def rank_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join(
    rank: int,
    world_size: int,
    device: torch.device,
    store: dist.Store | None,
    join_timeout_s: float,
    on_stuck: Callable[[str], None] | None = None,
) -> None:
    """Joins the group (through `store`, or torchrun's environment when None) and meets every
    rank at a barrier. If that takes longer than `join_timeout_s`, reports through `on_stuck`
    (default: stderr) and ends the process: a hung NCCL call cannot be interrupted."""

    def stuck():
        message = f"rank {rank} of {world_size} could not join the others within {join_timeout_s:.0f} s. {JOIN_HINT}"
        (on_stuck or _print)(message)
        os._exit(3)

    watchdog = threading.Timer(join_timeout_s, stuck)
    watchdog.daemon = True
    watchdog.start()
    try:
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {
            "backend": backend,
            "rank": rank,
            "world_size": world_size,
            "timeout": timedelta(seconds=OPERATION_TIMEOUT_S),
        }
        if store is None:
            options["init_method"] = "env://"
        else:
            options["store"] = store
        dist.init_process_group(**options)
        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()
    finally:
        watchdog.cancel()


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
