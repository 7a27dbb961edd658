"""Limits checked before anything is allocated, so a run that cannot fit fails at once with the
figure and the fix instead of an allocator's message after minutes (or the machine swapping)."""

from __future__ import annotations

import os

from .errors import InputError

# The model was trained at 688*368 and 704*384 and the official sizes reach 1280*720; past this
# the attention over one frame's tokens no longer fits any GPU.
MAX_SIDE = 2048
BYTES_PER_VALUE = 4  # ComfyUI's IMAGE is float32
# Kept frames may take at most this share of the memory available now: the rest of the run
# (models, caches, the encoder) needs room too.
RAM_SHARE = 0.8


def check_size(width: int, height: int) -> None:
    if max(width, height) > MAX_SIDE:
        raise InputError(
            f"size {width}*{height} is larger than LiveAvatar supports: each side at most {MAX_SIDE} pixels "
            "(it was trained at 688*368 and 704*384; the official sizes reach 1280*720)."
        )


def frames_bytes(frames: int, width: int, height: int) -> int:
    return frames * width * height * 3 * BYTES_PER_VALUE


def check_frames_fit(frames: int, width: int, height: int, available: int | None = None) -> None:
    """Refuses keeping `frames` frames in RAM (frames mode) when they would not fit."""
    needed = frames_bytes(frames, width, height)
    available = available_ram() if available is None else available
    if available is not None and needed > RAM_SHARE * available:
        raise InputError(
            f"output 'frames' keeps all {frames} frames of {width}*{height} in RAM: {needed / 2**30:.1f} GiB, but "
            f"only {available / 2**30:.1f} GiB is free. Use output 'mp4' (written clip by clip, memory stays "
            "flat for any length), or fewer clips (num_clip) or a smaller size."
        )


def available_ram() -> int | None:
    """Bytes of memory available to new allocations now (None where the system does not say)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # ComfyUI depends on it; other hosts may lack it

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
