"""Point-to-point messages between pipeline ranks: a kind, a (clip, block) tag and a few tensors.

One fixed-size int64 header says what follows (each tensor's dtype and shape), so the receiver
allocates exactly what arrives; then each tensor goes on its own. Tensors travel on the
process group's device (the rank's GPU with NCCL, the CPU with gloo).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.distributed as dist


class Kind(enum.IntEnum):
    BLOCK = 1  # a block's latents (and the solver's history) for the next rank
    SINK = 2  # the sink's reference and motion latents, from the decoding rank
    STOP = 3  # the run was stopped before (clip, block)
    INPUTS = 4  # torchrun: the run's inputs, from the rank that read them
    ABORT = 5  # torchrun: the inputs could not be read


MAX_TENSORS = 4
MAX_DIMS = 6
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)
_FIELDS = 2 + MAX_DIMS  # dtype, ndim, shape
_HEADER = 4 + MAX_TENSORS * _FIELDS  # kind, clip, block, count, then the tensors


@dataclass
class Message:
    kind: Kind
    clip: int = -1
    block: int = -1
    tensors: tuple[torch.Tensor, ...] = ()


def send(message: Message, dst: int, device: torch.device) -> None:
    tensors = [t.detach().to(device).contiguous() for t in message.tensors]
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message holds at most {MAX_TENSORS} tensors")
    header = [int(message.kind), message.clip, message.block, len(tensors)]
    for t in tensors:
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensors of at most {MAX_DIMS} dimensions travel, got {tuple(t.shape)}")
        header += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (MAX_DIMS - t.dim())]
    header += [0] * (_HEADER - len(header))
    dist.send(torch.tensor(header, dtype=torch.int64, device=device), dst)
    for t in tensors:
        dist.send(t, dst)


def recv(src: int, device: torch.device) -> Message:
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src)
    kind, clip, block, count, *fields = header.tolist()
    tensors = []
    for i in range(count):
        dtype, ndim, *shape = fields[i * _FIELDS : (i + 1) * _FIELDS]
        t = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=device)
        dist.recv(t, src)
        tensors.append(t)
    return Message(Kind(kind), clip, block, tuple(tensors))
