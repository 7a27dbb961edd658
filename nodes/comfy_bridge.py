"""The few ComfyUI services the nodes use, in one place: model folders, the compute device,
progress on the node, the Cancel button and the output folder.

ComfyUI modules are imported inside the functions, so the node classes can be imported (and
their schemas checked) without a running ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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


def free_memory_for(size_bytes: int, device) -> None:
    """Asks ComfyUI's manager for `size_bytes` on `device`: it unloads what its policy picks."""
    import comfy.model_management

    if getattr(device, "type", "cpu") != "cpu":
        comfy.model_management.free_memory(size_bytes, device)


def files_size(files) -> int:
    """Bytes of the checkpoint files in `files` (a ModelFiles): what loading them needs."""
    from liveavatar_core.models import whole_checkpoint

    total = 0
    for path in (files.dit, files.text_encoder, files.vae, files.audio_encoder, files.lora):
        if path is None:
            continue
        path = whole_checkpoint(path)
        parts = path.glob("*.safetensors") if path.is_dir() else [path]
        total += sum(p.stat().st_size for p in parts if p.is_file())
    return total


class LiveAvatarNetwork(torch.nn.Module):
    """Holds one of our networks for ComfyUI's ModelPatcher, which sets its own attributes
    (device, loaded memory) on the module it manages; ours have read-only `device` properties."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network


class ComfyPlacement:
    """`liveavatar_core.models.Placement` through ComfyUI's model manager.

    Each network gets a `ModelPatcher`; putting networks on the device is `load_models_gpu`,
    so ComfyUI frees room by its own policy and flags (--lowvram, --highvram, ...), counts
    ours in its bookkeeping and unloads them when a later node needs the memory. With
    `offload` (the loader's offload_model) they are unloaded as soon as the block is over and
    wait on the CPU; without it they stay loaded until ComfyUI needs the room, then wait where
    ComfyUI keeps idle diffusion models. Our networks are plain torch modules (no ComfyUI
    ops), so they are always loaded whole.
    """

    def __init__(self, offload: bool):
        self.offload = offload
        self._patchers: dict[int, object] = {}

    def patcher(self, module: torch.nn.Module, device):
        """The ModelPatcher of `module`, made on first use."""
        import comfy.model_management
        import comfy.model_patcher

        key = id(module)
        if key not in self._patchers:
            idle = torch.device("cpu") if self.offload else comfy.model_management.unet_offload_device()
            holder = LiveAvatarNetwork(module)
            if _same_device(_device_of(module), torch.device(device)):  # loaded straight onto the device
                holder.device = device
                holder.model_loaded_weight_memory = comfy.model_management.module_size(holder)
            self._patchers[key] = comfy.model_patcher.ModelPatcher(holder, load_device=device, offload_device=idle)
        return self._patchers[key]

    def make_room(self, device) -> None:
        """Frees `device` of every other model, keeping ours: a video's attention caches (tens
        of GB on the device) are not known to ComfyUI before they are made."""
        import comfy.model_management

        if getattr(device, "type", "cpu") == "cpu":
            return
        ours = [comfy.model_management.LoadedModel(p) for p in self._patchers.values()]
        comfy.model_management.free_memory(1e30, device, keep_loaded=ours)

    def acquire(self, networks: dict, device) -> None:
        import comfy.model_management

        comfy.model_management.load_models_gpu(
            [self.patcher(m, device) for m in networks.values()], force_full_load=True
        )
        for module in networks.values():  # under --novram ComfyUI loads no whole module itself
            module.to(device)

    def release(self, networks: dict, home, offload: bool) -> None:
        if offload:
            unload([self._patchers[id(m)] for m in networks.values() if id(m) in self._patchers])


def _device_of(module: torch.nn.Module) -> torch.device | None:
    first = next(iter(module.parameters()), None)
    return None if first is None else first.device


def _same_device(a: torch.device | None, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device (while cuda:0 is the current one)."""
    if a is None or a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def make_room_for_run(job) -> None:
    """Before a video whose attention caches live on the device: ComfyUI frees the other models."""
    models = job.models
    if isinstance(models.placement, ComfyPlacement) and job.spec.kv_cache == "device":
        models.placement.make_room(models.device)


def unload(patchers) -> None:
    """Takes `patchers` out of ComfyUI's loaded models (their weights go to their offload device)."""
    import comfy.model_management

    loaded = comfy.model_management.current_loaded_models
    for entry in [e for e in loaded if any(e.model is p for p in patchers)]:
        entry.model_unload()
        loaded.remove(entry)
    comfy.model_management.soft_empty_cache()


def loaded_patchers() -> list:
    """The ModelPatchers ComfyUI holds loaded now, newest first."""
    import comfy.model_management

    return [entry.model for entry in comfy.model_management.current_loaded_models]


def core_vae_weights(vae) -> dict:
    """The state dict of a core VAE (from Load VAE), if it is the Wan 2.1 VAE."""
    from comfy.ldm.wan.vae import WanVAE

    return _core_weights(
        vae,
        getattr(vae, "first_stage_model", None),
        WanVAE,
        "vae_model: this is not the Wan 2.1 VAE",
        "Load wan_2.1_vae.safetensors with Load VAE (the Wan 2.2 VAE does not fit this model).",
    )


def core_audio_encoder_weights(audio_encoder) -> dict:
    """The state dict of a core audio encoder (from Load Audio Encoder), if it is a wav2vec2."""
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model

    return _core_weights(
        audio_encoder,
        getattr(audio_encoder, "model", None),
        Wav2Vec2Model,
        "audio_encoder_model: this is not a wav2vec2",
        "Load wav2vec2_large_english*.safetensors with Load Audio Encoder.",
    )


def _core_weights(holder, model, expected: type, wrong: str, fix: str) -> dict:
    """`holder.get_sd()` when the network it holds is an `expected`; else InputError `wrong` + `fix`."""
    if not isinstance(model, expected):
        raise InputError(f"{wrong} ({type(model).__name__}). {fix}")
    return holder.get_sd()


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


def new_output_file(
    prefix: str, width: int, height: int, extension: str, default_prefix: str = "LiveAvatar/avatar"
) -> tuple[Path, str, str]:
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


def output_folder(
    prefix: str, width: int, height: int, default_prefix: str = "LiveAvatar/avatar"
) -> tuple[Path, str, str]:
    """Where `new_output_file` puts files of this prefix: (folder, file name stem, subfolder)."""
    import folder_paths

    from liveavatar_core.output_names import checked_prefix

    prefix = checked_prefix(prefix, default_prefix)
    folder, name, _, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height
    )
    return Path(folder), name, subfolder


def show_output_on_node(ui: dict) -> None:
    """Shows `ui` (as a node's {"ui": ...} would) on the running node, for a node that is about
    to raise: ComfyUI records no outputs of a failed node, but the canvas shows this one."""
    try:
        from server import PromptServer

        server = PromptServer.instance
        node = server.last_node_id
        if server.client_id is not None and node is not None:
            server.send_sync(
                "executed",
                {"node": node, "display_node": node, "output": ui, "prompt_id": server.last_prompt_id},
                server.client_id,
            )
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
