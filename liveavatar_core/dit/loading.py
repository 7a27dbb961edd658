"""Loading the S2V DiT from the official shards or ComfyUI's single files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..tensor_files import TensorFile, open_tensor_file
from ..weights import build_empty, load_weights
from .config import S2VConfig, config_from_shapes
from .fp8 import FP8, SCALED_FP8_MARKER, use_fp8_layers_
from .model import WanS2VTransformer

# ComfyUI's repackaged files may keep the prefix of a full ComfyUI model state dict.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
CONFIG_METADATA_KEY = "liveavatar_dit_config"


def _config_hints(path: Path, tensors: TensorFile) -> tuple[dict, str]:
    """What shapes cannot tell (heads, injection layers), from wherever the release keeps it:
    an official `config.json` beside the weights, or a config stored in the file's metadata.
    Returns the hints and where they came from (for error messages)."""
    metadata = tensors.metadata()
    if CONFIG_METADATA_KEY in metadata:
        source = f"the {CONFIG_METADATA_KEY!r} metadata of {tensors.label}"
        return _json_object(
            metadata[CONFIG_METADATA_KEY],
            source,
            "Write the file again (save_dit) or remove that metadata and put the model's config.json next to it.",
        ), source
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if config_file.exists():
        try:
            text = config_file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_file}: could not be read ({err}). Download config.json again.") from None
        return _json_object(text, str(config_file), "Download the model's config.json again."), str(config_file)
    return {}, ""


def _json_object(text: str, source: str, fix: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{source} is not valid JSON ({err.args[0]}). {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{source} is not a JSON object of settings. {fix}")
    return value


def _drop_fp8_extras(name: str) -> str | None:
    # Input scales of ComfyUI's scaled-fp8 files are not used: inputs are scaled at run time
    # (one scale per call by default, see `fp8.ACTIVATION_SCALINGS`).
    return None if name == SCALED_FP8_MARKER or name.endswith(".scale_input") else name


def open_dit_file(path: str | Path) -> tuple[TensorFile, S2VConfig]:
    path = Path(path)
    tensors = open_tensor_file(path).without_prefix(DIT_PREFIXES).renamed(_drop_fp8_extras)
    hints, source = _config_hints(path, tensors)
    config = config_from_shapes(tensors.shapes(), tensors.label, hints, source)
    return tensors, config


def fp8_layers_in_file(tensors: TensorFile) -> list[str]:
    """The layers a scaled-fp8 file stores in fp8 (those with a `scale_weight`)."""
    return [name.removesuffix(".scale_weight") for name in tensors.keys() if name.endswith(".scale_weight")]


def load_dit(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> WanS2VTransformer:
    """Builds the DiT described by the checkpoint at `path` and loads it strictly.

    `dtype` is the dtype of every weight, except that the layers a scaled-fp8 file stores in
    fp8 stay fp8 (`Fp8Linear`; see `fp8.dequantize_dit_` for a bf16 model)."""
    tensors, config = open_dit_file(path)
    model = build_empty(lambda: WanS2VTransformer(config))
    fp8_layers = fp8_layers_in_file(tensors)
    use_fp8_layers_(model, fp8_layers)
    fp8_tensors = {f"{name}.{part}" for name in fp8_layers for part in ("weight", "scale_weight")}
    load_weights(
        model,
        tensors,
        what="Wan2.2-S2V diffusion model",
        device=device,
        dtype=dtype,
        keep_dtype=lambda name: name in fp8_tensors,
        fix="Use the Wan2.2-S2V-14B checkpoint (official shards or ComfyUI's wan2.2_s2v_14B_*.safetensors).",
    )
    for name in fp8_layers:
        layer = model.get_submodule(name)
        if layer.weight.dtype != FP8:
            raise CheckpointError(f"{tensors.label}: {name}.weight has a scale_weight but is not stored in fp8 e4m3.")
        layer.compute_dtype = dtype
    return model.eval().requires_grad_(False)


def save_dit(model: WanS2VTransformer, path: str | Path, prefix: str = "") -> None:
    """Writes one safetensors file in the official names (optionally under a ComfyUI prefix),
    with the configuration in its metadata so it loads without a config.json."""
    from safetensors.torch import save_file

    state = {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={CONFIG_METADATA_KEY: model.config.to_json()})
