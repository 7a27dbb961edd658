"""Configuration of the Wan2.2-S2V DiT, and its detection from a checkpoint's tensors."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from ..errors import CheckpointError

# Attention heads are not visible in tensor shapes (q/k/v are dim x dim); every released Wan
# model uses 128 channels per head, so that is the fallback when no config.json is present.
HEAD_DIM = 128
# Which blocks are followed by an audio injector is not visible in the tensors either.
WAN22_S2V_14B_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
# Pixel frames of motion context Wan2.2-S2V was trained with (19 latent frames).
MOTION_FRAMES = 73


@dataclass(frozen=True)
class S2VConfig:
    """Hyper-parameters of `WanS2VTransformer` (defaults: the released 14B model)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    audio_dim: int = 1024
    num_audio_layers: int = 25
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = WAN22_S2V_14B_INJECT_LAYERS
    cond_dim: int = 16
    motion_frames: int = MOTION_FRAMES
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)
    eps: float = 1e-6
    # Temporal RoPE index of the reference frame in Wan2.2-S2V.
    ref_rope_index: int = 30

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


REQUIRED_TENSORS = (
    "patch_embedding.weight",
    "casual_audio_encoder.weights",
    "blocks.0.ffn.0.weight",
    "head.head.weight",
    "time_embedding.0.weight",
    "text_embedding.0.weight",
    "casual_audio_encoder.encoder.conv1_local.conv.weight",
)
RIGHT_FILE = "Pick the Wan2.2-S2V-14B checkpoint (official shards or ComfyUI's wan2.2_s2v_14B_*.safetensors)."


def config_from_shapes(
    shapes: dict[str, tuple[int, ...]], label: str, hints: dict | None = None, hints_source: str = ""
) -> S2VConfig:
    """Reads the configuration off the tensor shapes of a Wan2.2-S2V checkpoint.

    `hints` (an official `config.json`, or the config stored in a file's metadata, named by
    `hints_source` in errors) supplies what shapes cannot tell: the head count and the
    audio-injection layers. Every value is checked against the shapes here, so a bad config
    fails at load with one message, not seconds later deep in the first forward pass.
    """
    hints = hints or {}
    source = hints_source or "the model's config"
    if "patch_embedding.weight" not in shapes or "casual_audio_encoder.weights" not in shapes:
        raise CheckpointError(
            f"{label}: this is not a Wan2.2-S2V / LiveAvatar diffusion model (no 'patch_embedding.weight' or "
            f"'casual_audio_encoder.weights'). {RIGHT_FILE}"
        )
    missing = [k for k in REQUIRED_TENSORS if k not in shapes]
    if missing:
        raise CheckpointError(
            f"{label}: the diffusion model lacks {len(missing)} required tensor(s), e.g. {missing[:3]}; the file "
            f"is incomplete or was cut down. Download it again. {RIGHT_FILE}"
        )
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_injectors = len({m.group(1) for k in shapes if (m := re.match(r"audio_injector\.injector\.(\d+)\.", k))})
    conv1_local = shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"]

    def bad(field: str, value, why: str, fix: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field} = {value!r} {why}. {fix}")

    num_heads = _positive_int(
        hints.get("num_heads", dim // HEAD_DIM),
        "num_heads",
        bad,
        f"Set num_heads so that {dim} / num_heads is even (the released models use "
        f"{HEAD_DIM} channels per head: {max(1, dim // HEAD_DIM)}).",
    )
    if dim % num_heads or (dim // num_heads) % 2:
        raise bad(
            "num_heads",
            num_heads,
            f"does not split the model width {dim} into heads of an even size",
            f"Set num_heads to a divisor of {dim} leaving an even head size (e.g. {max(1, dim // HEAD_DIM)}), "
            "or use the config.json that came with this model.",
        )
    inject = hints.get("audio_inject_layers")
    if inject is None:
        if (num_layers, num_injectors) != (40, len(WAN22_S2V_14B_INJECT_LAYERS)):
            raise CheckpointError(
                f"{label}: {num_layers} blocks with {num_injectors} audio injectors is not the released 14B "
                "layout, and the file does not say after which blocks the injectors sit. Put the model's "
                "config.json next to the file."
            )
        inject = WAN22_S2V_14B_INJECT_LAYERS
    if not isinstance(inject, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in inject):
        raise bad(
            "audio_inject_layers",
            inject,
            "is not a list of block numbers",
            "Use the config.json that came with this model.",
        )
    if len(inject) != num_injectors:
        raise CheckpointError(
            f"{label}: the config lists {len(inject)} audio-injection layers but the file holds "
            f"{num_injectors} injectors. The config.json belongs to another model."
        )
    if len(set(inject)) != len(inject) or any(not 0 <= i < num_layers for i in inject):
        raise bad(
            "audio_inject_layers",
            list(inject),
            f"names blocks outside 0..{num_layers - 1} or twice",
            "Use the config.json that came with this model.",
        )
    text_len = _positive_int(hints.get("text_len", 512), "text_len", bad, "Use 512, umT5's length in Wan2.2.")
    motion_frames = _positive_int(
        hints.get("motion_frames", MOTION_FRAMES), "motion_frames", bad, "Use 73, as Wan2.2-S2V."
    )
    eps = hints.get("eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise bad("eps", eps, "is not a small positive number", "Use 1e-6, as Wan2.2-S2V.")
    if dim < 4 or conv1_local[0] % (dim // 4):
        raise CheckpointError(
            f"{label}: the audio encoder's conv1_local {conv1_local} does not fit the width {dim}. "
            f"The file is damaged or of another model. {RIGHT_FILE}"
        )
    return S2VConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=num_heads,
        num_layers=num_layers,
        in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2]),
        patch_size=tuple(patch),
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        text_len=text_len,
        audio_dim=conv1_local[1],
        num_audio_layers=shapes["casual_audio_encoder.weights"][1],
        num_audio_token=conv1_local[0] // (dim // 4),
        audio_inject_layers=tuple(int(i) for i in inject),
        cond_dim=shapes["cond_encoder.weight"][1] if "cond_encoder.weight" in shapes else 0,
        motion_frames=motion_frames,
        eps=float(eps),
    )


def _positive_int(value, field: str, bad, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        raise bad(field, value, "is not a positive whole number", fix)
    return value
