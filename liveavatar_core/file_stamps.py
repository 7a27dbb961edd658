"""What a model file looks like on disk right now (size and modification time), so a host can
tell that a file it loaded from was replaced and load it again."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".json", ".pth", ".pt", ".bin", ".ckpt", ".model")


def file_stamp(path: str | os.PathLike | None) -> str:
    """'path:size:mtime' for a file; for a folder (a sharded release) the stamps of the weight
    files in it. A missing path has a stamp of its own, so its appearance counts as a change."""
    if path is None:
        return "none"
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        return ";".join(file_stamp(p) for p in files) or f"{path}:empty"
    try:
        stat = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
