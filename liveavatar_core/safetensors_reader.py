"""Reading `.safetensors` files into memory the caller owns.

safetensors' own loader maps the file and hands out tensors that live in that mapping: a file
overwritten in place then changes a loaded model behind its back, and a file truncated on disk
kills the process (SIGBUS) the next time a page is touched. Here the header is parsed and
checked against the file's size up front (a cut-off download is named at open time), and each
tensor is read with an ordinary `read` into a fresh buffer, so nothing loaded depends on the
file afterwards.

The format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from .errors import CheckpointError

# Headers of the real 14B checkpoints are a few hundred kB; anything near this is not a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


class SafetensorsFile:
    """The header of one safetensors file; `read(name)` returns an owned tensor."""

    def __init__(self, path: str):
        self.path = path
        self.entries, self.metadata = _read_header(path)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        size = entry.end - entry.begin
        buffer = torch.empty(size, dtype=torch.uint8)
        try:
            with open(self.path, "rb") as file:
                file.seek(entry.begin)
                got = file.readinto(memoryview(buffer.numpy())) if size else 0
        except OSError as err:
            raise CheckpointError(
                f"{self.path}: could not be read ({err.strerror}). Check the file and its permissions."
            ) from None
        if got != size:
            raise CheckpointError(
                f"{self.path}: the file became shorter while loading ({name} is cut off). It was changed on "
                "disk during the load: wait until the copy or download has finished, then load again."
            )
        return buffer.view(entry.dtype).reshape(entry.shape)


def _read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise _damaged(path, f"{file_size} bytes, too short for a header")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER_BYTES, file_size - 8):
                raise _damaged(path, f"its header claims {header_size} bytes")
            raw = file.read(header_size)
    except OSError as err:
        raise CheckpointError(
            f"{path}: could not be opened ({err.strerror}). Check the file and its permissions."
        ) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _damaged(path, "its __metadata__ is not a JSON object")
    data_start = 8 + header_size
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"the header entry of {name!r} is malformed") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or begin < 0 or end - begin != expected:
            raise _damaged(path, f"the header entry of {name!r} does not match its shape")
        if data_start + end > file_size:
            raise _damaged(path, f"{name!r} ends at byte {data_start + end} but the file has {file_size} bytes")
        entries[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _damaged(path: str, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: the safetensors file is damaged or incomplete ({detail}). "
        "It was probably cut off while downloading or copying: download it again."
    )
