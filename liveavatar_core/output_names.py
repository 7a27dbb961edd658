"""Checks of the file-name prefix a user types for an output file, before anything is made.

The prefix may hold sub-folders ("LiveAvatar/avatar"); it must stay inside the output folder
and be a name every file system takes, so a bad one is refused with the fix instead of failing
after the run, writing a hidden file, or leaving an empty junk folder.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import InputError

MAX_PART_LENGTH = 200  # file systems allow 255 bytes per name; the counter and extension follow
_DRIVE = re.compile(r"^[A-Za-z]:")


def checked_prefix(prefix, default: str, name: str = "filename_prefix") -> str:
    """The prefix to use: `default` for an empty one, `default`'s file name appended to one that
    ends in a folder ("clips/"); InputError for control characters, '..', absolute paths."""
    if not isinstance(prefix, str):
        raise InputError(f"{name} must be text, got {type(prefix).__name__}. Use e.g. {default!r}.")
    prefix = prefix.strip()
    if not prefix:
        return default
    bad = next((c for c in prefix if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise InputError(
            f"{name} holds a control character (U+{ord(bad):04X}); use letters, digits, '-', '_' "
            f"and '/' for sub-folders, e.g. {default!r}."
        )
    if prefix.startswith(("/", "\\")) or _DRIVE.match(prefix):
        raise InputError(
            f"{name} {prefix!r} is an absolute path; give a name inside ComfyUI's output folder, e.g. {default!r}."
        )
    parts = re.split(r"[/\\]", prefix)
    if any(part in ("..", ".") for part in parts):
        raise InputError(
            f"{name} {prefix!r} steps out of or around its folder with '..' or '.'; give a name "
            f"inside ComfyUI's output folder, e.g. {default!r}."
        )
    if any(len(part) > MAX_PART_LENGTH for part in parts):
        raise InputError(f"{name}: a part of {prefix!r} is longer than {MAX_PART_LENGTH} characters; shorten it.")
    folders = [part for part in parts[:-1] if part]
    file = parts[-1] or default.replace("\\", "/").rsplit("/", 1)[-1]
    return "/".join(folders + [file])
