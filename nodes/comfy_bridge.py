"""The few ComfyUI services the nodes use, in one place: model folders, the compute device,
progress on the node, the Cancel button and the output folder.

ComfyUI modules are imported inside the functions, so the node classes can be imported (and
their schemas checked) without a running ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

from liveavatar_core.errors import InputError


def model_files(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(folder)


def model_path(folder: str, name: str, input_name: str) -> Path:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise InputError(
            f"{input_name}: '{name}' is not in ComfyUI's models/{folder}/ folder. Put the file there "
            "(see the pack's README for which file goes where) and press R in the canvas to refresh the lists."
        )
    return Path(path)


def model_file_stamps(files: dict[str, str]) -> str:
    """Size and modification time of each picked file ({folder: name}); see `file_stamps`."""
    import folder_paths

    from liveavatar_core.file_stamps import file_stamp
    from liveavatar_core.models import whole_checkpoint

    stamps = []
    for folder, name in files.items():
        path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
        stamps.append(file_stamp(whole_checkpoint(path) if path else None))
    return "|".join(stamps)


def compute_device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def make_room_on(device) -> None:
    """Asks ComfyUI to unload its own models from `device`: ours are not in its manager."""
    import comfy.model_management

    if getattr(device, "type", "cpu") != "cpu":
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()


def cancel_requested() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def interrupted_error() -> BaseException:
    """What ComfyUI expects a node to raise when the user pressed Cancel (clearing the flag,
    as ComfyUI's own check does, so the next prompt starts clean)."""
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(False)
    return comfy.model_management.InterruptProcessingException()


class NodeProgress:
    """The node's progress bar, counted in DiT steps, with the latest frame as its preview."""

    PREVIEW_SIZE = 512

    def __init__(self, total_steps: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(1, total_steps))
        self.steps = 0
        self.preview = None

    def on_step(self, _progress) -> None:
        self.steps += 1
        self.bar.update_absolute(self.steps, preview=self.preview)

    def on_frames(self, frames) -> None:
        from PIL import Image

        last = (frames[-1].clamp(0, 1) * 255).round().byte().numpy()
        self.preview = ("JPEG", Image.fromarray(last), self.PREVIEW_SIZE)


def new_output_file(prefix: str, width: int, height: int, extension: str,
                    default_prefix: str = "LiveAvatar/avatar") -> tuple[Path, str, str]:
    """A fresh file name in ComfyUI's output folder: (path, file name, subfolder). The prefix is
    checked first (see `output_names`); the file itself is made by the writer."""
    import folder_paths

    from liveavatar_core.output_names import checked_prefix

    prefix = checked_prefix(prefix, default_prefix)
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height
    )
    os.makedirs(folder, exist_ok=True)
    file = f"{name}_{counter:05}_.{extension}"
    return Path(folder) / file, file, subfolder


def show_output_on_node(ui: dict) -> None:
    """Shows `ui` (as a node's {"ui": ...} would) on the running node, for a node that is about
    to raise: ComfyUI records no outputs of a failed node, but the canvas shows this one."""
    try:
        from server import PromptServer

        server = PromptServer.instance
        node = server.last_node_id
        if server.client_id is not None and node is not None:
            server.send_sync("executed", {"node": node, "display_node": node, "output": ui,
                                          "prompt_id": server.last_prompt_id}, server.client_id)
    except Exception:  # showing is a courtesy: the node's own error matters more
        pass


def video_from_file(path: Path):
    from comfy_api.input_impl import VideoFromFile

    return VideoFromFile(str(path))


def video_from_frames(frames, audio: dict | None, fps: float):
    from fractions import Fraction

    from comfy_api.input_impl import VideoFromComponents
    from comfy_api.util import VideoComponents

    return VideoFromComponents(VideoComponents(images=frames, audio=audio, frame_rate=Fraction(fps)))
