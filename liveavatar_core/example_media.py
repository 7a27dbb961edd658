"""Copies the presets' example portrait and speech track into a ComfyUI `input/` folder.

The preset workflows load `liveavatar_example_portrait.png` and `liveavatar_example_speech.wav`
with core Load Image / Load Audio, which read from ComfyUI's `input/` folder. The files ship
with the pack in `workflows/media/`; this puts them where the workflows look for them:

    python -m liveavatar_core.example_media --input-dir ComfyUI/input

Files already there with the same content are left alone; nothing else in the folder is touched.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
from pathlib import Path

MEDIA_DIR = Path(__file__).resolve().parents[1] / "workflows" / "media"


def example_media_files() -> list[Path]:
    """The example files the preset workflows name, in a stable order."""
    return sorted(path for path in MEDIA_DIR.iterdir() if path.is_file())


def copy_example_media(input_dir: str | Path) -> list[Path]:
    """Copies every example file into `input_dir` (created if missing); returns the copies' paths."""
    target = Path(input_dir)
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in example_media_files():
        destination = target / source.name
        if not (destination.is_file() and filecmp.cmp(source, destination, shallow=False)):
            shutil.copy2(source, destination)
        copies.append(destination)
    return copies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m liveavatar_core.example_media",
        description="Copy the preset workflows' example portrait and speech track into ComfyUI's input folder.",
    )
    parser.add_argument("--input-dir", required=True, help="ComfyUI's input folder (e.g. ComfyUI/input)")
    args = parser.parse_args(argv)
    for path in copy_example_media(args.input_dir):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
