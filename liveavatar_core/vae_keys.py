"""Tensor names of the Wan2.1 VAE: which layout a file uses, and the way to diffusers' names.

Three layouts hold the same 194 tensors:

- Wan's own names (`encoder.downsamples.*`, `decoder.upsamples.*`, `conv1`, `conv2`): the official
  `Wan2.1_VAE.pth`, and ComfyUI's repackaged `vae/wan_2.1_vae.safetensors` (ComfyUI builds its
  VAE from these very names).
- The same names under a prefix, as in whole-model files: `vae.` (ComfyUI's Wan checkpoints) or
  `first_stage_model.` (ComfyUI's generic checkpoint layout).
- diffusers' names (`encoder.down_blocks.*`, `quant_conv`, ...), as in `vae/` of a diffusers
  Wan repository.

Everything is reduced to diffusers' names, since `AutoencoderKLWan` is the module we load into.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from .errors import CheckpointError
from .tensor_files import TensorFile

# One tensor that only this network has, in each naming.
WAN_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
# Present in Wan names only in the Wan2.2 VAE (48 latent channels), whose decoder nests its blocks.
WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
VAE_PREFIXES = ("vae.", "first_stage_model.")

LATENT_CHANNELS = 16
WAN22_LATENT_CHANNELS = 48

RIGHT_FILE = (
    "As the VAE, pick `Wan2.1_VAE.pth` from the Wan2.2-S2V-14B folder or ComfyUI's "
    "`models/vae/wan_2.1_vae.safetensors`."
)


@dataclass(frozen=True)
class VAEShape:
    """What the tensors tell about the `AutoencoderKLWan` to build (the rest is fixed by Wan2.1)."""

    base_dim: int = 96
    z_dim: int = LATENT_CHANNELS


def wan_to_diffusers_names(names: Iterable[str], label: str = "VAE file") -> dict[str, str]:
    """Maps each Wan-style VAE tensor name to diffusers' `AutoencoderKLWan` name.

    Names the converter does not know are kept as they are, so a strict load reports them.
    """
    names = list(names)
    # The converter carries values along with names; giving it the names as values yields
    # {new name: old name} without touching any tensor.
    new_to_old = convert_wan_vae_to_diffusers({name: name for name in names})
    if len(new_to_old) != len(names):
        raise CheckpointError(
            f"{label}: two tensors map to the same diffusers name; the file mixes two VAE layouts. {RIGHT_FILE}"
        )
    return {old: new for new, old in new_to_old.items()}


def vae_tensors_in_diffusers_names(tensors: TensorFile) -> TensorFile:
    """A view of the VAE tensors of `tensors` under diffusers' names.

    Raises:
        CheckpointError: the file holds another network (named in the message), or the Wan2.2 VAE.
    """
    keys = set(tensors.keys())
    prefix = next(
        (p for p in ("", *VAE_PREFIXES) if p + WAN_MARKER in keys or p + DIFFUSERS_MARKER in keys),
        None,
    )
    if prefix is None:
        raise CheckpointError(_not_a_vae_message(tensors.label, keys))
    if prefix:
        # A whole-model file: keep only the VAE's tensors.
        tensors = tensors.under(prefix)
    if WAN22_MARKER in tensors:
        raise CheckpointError(_wan22_message(tensors.label))
    if WAN_MARKER in tensors:
        mapping = wan_to_diffusers_names(tensors.keys(), tensors.label)
        tensors = tensors.renamed(mapping.__getitem__)
    return tensors


def vae_shape(tensors: TensorFile) -> VAEShape:
    """Reads the base width and latent channels from tensors in diffusers' names.

    Tensors it needs but cannot find leave the default, so the strict load names them as missing.
    """
    base_dim = VAEShape.base_dim
    if "encoder.conv_in.weight" in tensors:
        base_dim = tensors.shape("encoder.conv_in.weight")[0]
    if "post_quant_conv.weight" in tensors:
        z_dim = tensors.shape("post_quant_conv.weight")[0]
        if z_dim == WAN22_LATENT_CHANNELS:
            raise CheckpointError(_wan22_message(tensors.label))
        if z_dim != LATENT_CHANNELS:
            raise CheckpointError(
                f"{tensors.label}: this VAE has {z_dim} latent channels; LiveAvatar needs the Wan2.1 VAE "
                f"with {LATENT_CHANNELS}. {RIGHT_FILE}"
            )
    return VAEShape(base_dim=base_dim)


def _wan22_message(label: str) -> str:
    return (
        f"{label}: this is the Wan2.2 VAE (48 latent channels, made for Wan2.2-TI2V-5B). "
        f"Wan2.2-S2V and LiveAvatar use the Wan2.1 VAE (16 channels). {RIGHT_FILE}"
    )


def _not_a_vae_message(label: str, keys: set[str]) -> str:
    found = identify_network(keys)
    if found is None:
        return (
            f"{label}: does not hold the Wan2.1 VAE (no tensor named {WAN_MARKER!r} or "
            f"{DIFFUSERS_MARKER!r}, optionally under {' or '.join(map(repr, VAE_PREFIXES))}). {RIGHT_FILE}"
        )
    network, folder = found
    return f"{label}: this looks like {network}, not the Wan2.1 VAE; it belongs in {folder}. {RIGHT_FILE}"


def identify_network(keys: Iterable[str]) -> tuple[str, str] | None:
    """Guesses which network of the release a set of tensor names belongs to.

    Returns `(description, where it belongs)`, or None when the names fit none of them.
    """
    keys = set(keys)

    def any_key(test) -> bool:
        return any(test(k) for k in keys)

    if any_key(lambda k: "lora_" in k or ".lora." in k):
        return "a LoRA (such as liveavatar.safetensors)", "models/loras (the LiveAvatar LoRA input)"
    if (
        "token_embedding.weight" in keys
        or "shared.weight" in keys
        or any_key(lambda k: k.startswith(("encoder.block.", "text_encoders.")) or ".SelfAttention." in k)
    ):
        return "the umT5 text encoder", "models/text_encoders (the text-encoder input)"
    if any_key(lambda k: "patch_embedding" in k or ".self_attn." in k or k.startswith("model.diffusion_model.")):
        return "the Wan2.2-S2V diffusion model (DiT)", "models/diffusion_models (the model input)"
    if any_key(lambda k: "feature_extractor" in k or "feature_projection" in k or k.startswith("wav2vec2.")):
        return "the wav2vec2 audio encoder", "models/audio_encoders (the audio-encoder input)"
    return None
