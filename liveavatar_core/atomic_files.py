"""Files that are either absent or whole: written beside their place, synced, then renamed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Calls `write(partial)` for a hidden file beside `path`, syncs it and renames it to `path`,
    so a kill at any moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    with open(partial, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(partial, path)
