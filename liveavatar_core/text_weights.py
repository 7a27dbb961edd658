"""The umT5-XXL text encoder's checkpoint layouts, mapped onto transformers' `UMT5EncoderModel`.

Layouts read:

- Wan's own (`models_t5_umt5-xxl-enc-bf16.pth` in the Wan2.2 download): `token_embedding`,
  `blocks.{i}.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},pos_embedding.embedding}`, `norm`.
- transformers' (also ComfyUI's repackaged `umt5_xxl_fp16.safetensors` and
  `umt5_xxl_fp8_e4m3fn_scaled.safetensors`): `shared`, `encoder.block.{i}.layer.0.SelfAttention.*`,
  `encoder.block.{i}.layer.{0,1}.layer_norm`, `encoder.block.{i}.layer.1.DenseReluDense.*`,
  `encoder.final_layer_norm`. ComfyUI's files may add a `spiece_model` tensor (the tokenizer),
  a `scaled_fp8` marker and per-layer fp8 scales.

Facts behind the mapping (both implementations are pre-norm, RMS-style norms without bias or
mean subtraction, eps 1e-6, no attention scaling, tanh-approximated GELU):

- Wan's feed-forward is `fc2(fc1(x) * gelu(gate(x)))`; transformers' is
  `wo(gelu(wi_0(x)) * wi_1(x))`. So `gate.0` -> `wi_0`, `fc1` -> `wi_1`, `fc2` -> `wo`.
- umT5 has its own relative position embedding in every layer (`shared_pos=False` in Wan),
  a [32 buckets, 64 heads] table: `blocks.{i}.pos_embedding.embedding` ->
  `encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias`. Both use bidirectional
  buckets with max distance 128.
- Wan's final `norm` is transformers' `encoder.final_layer_norm`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from transformers import UMT5Config

from .errors import CheckpointError
from .tensor_files import TensorFile

WAN_LAYOUT = "wan"
TRANSFORMERS_LAYOUT = "transformers"

# Where ComfyUI keeps the text model when it saves a CLIP (`umt5xxl.transformer.`) or a whole
# checkpoint (`text_encoders.` before everything of the text encoder, tokenizer included).
COMFYUI_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.")
TOKENIZER_KEY = "spiece_model"
TOKENIZER_NAMES = (TOKENIZER_KEY, "text_encoders." + TOKENIZER_KEY)
FP8_MARKER_KEY = "scaled_fp8"
# Alias of `shared.weight` that some exports keep; the model ties the two.
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"

# fp8 checkpoints: the per-tensor weight scale under either of ComfyUI's spellings
# (`scale_weight`: the "scaled_fp8" format; `weight_scale`: the newer quantisation metadata).
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Activation scales only matter to fp8 matmuls; weights are dequantised here, so they go.
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")

# Wan module path -> transformers module path (parameter names follow unchanged).
_WAN_BLOCK_MODULES = {
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}
_WAN_TOP_MODULES = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}
_WAN_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")

# Names that tell other networks apart, for an error that says what the file is.
_OTHER_NETWORKS = (
    ("a Wan2.1/2.2 VAE", ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight")),
    (
        "a Wan diffusion model (DiT)",
        ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "model.diffusion_model.patch_embedding.weight"),
    ),
    (
        "a wav2vec2 audio encoder",
        ("wav2vec2.feature_extractor.conv_layers.0.conv.weight", "feature_extractor.conv_layers.0.conv.weight"),
    ),
    (
        "a CLIP text/vision encoder",
        ("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.patch_embedding.weight"),
    ),
)

WRONG_FILE_FIX = (
    "Choose the umT5-XXL text encoder: ComfyUI's text_encoders/umt5_xxl_fp16.safetensors (or "
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors), or models_t5_umt5-xxl-enc-bf16.pth from the "
    "Wan2.2-S2V-14B download."
)


def wan_to_transformers_name(name: str) -> str:
    """Maps one tensor name of Wan's layout to transformers'; names it does not know pass unchanged
    (so strict loading reports them)."""
    module, _, param = name.rpartition(".")
    if module in _WAN_TOP_MODULES:
        return f"{_WAN_TOP_MODULES[module]}.{param}"
    match = _WAN_BLOCK_NAME.fullmatch(module)
    if match and match.group(2) in _WAN_BLOCK_MODULES:
        return f"encoder.block.{match.group(1)}.{_WAN_BLOCK_MODULES[match.group(2)]}.{param}"
    return name


def text_encoder_part(tensors: TensorFile) -> TensorFile:
    """The text encoder's tensors (and tokenizer) under their own names, from a file that may
    keep them under ComfyUI's prefixes beside other networks."""
    names = tensors.keys()
    prefix = next((p for p in COMFYUI_PREFIXES if any(n.startswith(p) for n in names)), None)
    if prefix is None:
        return tensors

    def select(name: str) -> str | None:
        if name.startswith(prefix):
            return name[len(prefix) :]
        return TOKENIZER_KEY if name in TOKENIZER_NAMES else None

    return tensors.renamed(select)


def detect_layout(tensors: TensorFile) -> str:
    """`WAN_LAYOUT` or `TRANSFORMERS_LAYOUT`; raises CheckpointError for any other network."""
    names = set(tensors.keys())
    if "token_embedding.weight" in names and "blocks.0.ffn.fc1.weight" in names:
        return WAN_LAYOUT
    has_embedding = "shared.weight" in names or EMBEDDING_ALIAS in names
    if has_embedding and "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in names:
        if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in names and (
            "encoder.block.1.layer.0.SelfAttention.q.weight" in names
        ):
            raise CheckpointError(
                f"{tensors.label}: holds a T5 text encoder (one shared position table, as in the "
                "t5xxl files of Flux and SD3), not umT5-XXL (one table per layer). " + WRONG_FILE_FIX
            )
        return TRANSFORMERS_LAYOUT
    guess = next((what for what, keys in _OTHER_NETWORKS if any(k in names for k in keys)), None)
    if guess is None and any(".lora_" in n for n in names):
        guess = "a LoRA"
    found = f"it looks like {guess}" if guess else f"its first tensors are {sorted(names)[:3]}"
    raise CheckpointError(f"{tensors.label}: is not a umT5-XXL text encoder ({found}). {WRONG_FILE_FIX}")


def to_transformers_names(tensors: TensorFile) -> TensorFile:
    """A view of the text encoder's tensors under `UMT5EncoderModel`'s names, with the tokenizer,
    the fp8 marker and the embedding alias left out (scales stay, for `DequantizedTensors`)."""
    if detect_layout(tensors) == WAN_LAYOUT:
        tensors = tensors.renamed(wan_to_transformers_name)
    has_shared = "shared.weight" in tensors

    def keep(name: str) -> str | None:
        if name in (TOKENIZER_KEY, FP8_MARKER_KEY) or (name == EMBEDDING_ALIAS and has_shared):
            return None
        return "shared.weight" if name == EMBEDDING_ALIAS else name

    return tensors.renamed(keep)


class DequantizedTensors:
    """Read-only view of a `TensorFile` whose fp8 weights come back multiplied by their scale.

    A weight `X.weight` with a sibling `X.scale_weight` (or `X.weight_scale`) is returned as
    `weight.float() * scale` in float32 (the caller casts it to the model's dtype); the scale
    and activation-scale tensors are hidden. Other tensors pass through unchanged.
    """

    def __init__(self, tensors: TensorFile):
        self.label = tensors.label
        self._tensors = tensors
        names = set(tensors.keys())
        self._scales: dict[str, str] = {}
        hidden = set()
        for name in names:
            for suffix in WEIGHT_SCALE_SUFFIXES:
                if name.endswith(suffix):
                    weight = name[: -len(suffix)] + ".weight"
                    if weight in names:
                        self._scales[weight] = name
                        hidden.add(name)
            if name.endswith(INPUT_SCALE_SUFFIXES):
                hidden.add(name)
        self._names = [n for n in tensors.keys() if n not in hidden]

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors.shape(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self._names}

    def get(self, name: str) -> torch.Tensor:
        value = self._tensors.get(name)
        if name not in self._scales:
            return value
        scale = self._tensors.get(self._scales[name]).float()
        if scale.numel() > 1 and scale.ndim == 1 and value.ndim == 2:
            scale = scale.reshape(-1, 1)  # one scale per output row
        return value.float() * scale


def config_from_shapes(shapes: dict[str, tuple[int, ...]], label: str) -> UMT5Config:
    """The `UMT5Config` of the encoder whose tensors (transformers' names) have these shapes.

    The full-size file gives umT5-XXL: vocab 256384, d_model 4096, 24 layers, 64 heads of 64,
    d_ff 10240, gated GELU, 32 position buckets (max distance 128, which shapes cannot show).
    """
    try:
        vocab, d_model = shapes["shared.weight"]
        num_buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner_dim = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"{label}: the umT5 text encoder's first layer is incomplete (no {err}). The file is "
            f"damaged or cut off: download it again. {WRONG_FILE_FIX}"
        ) from None
    layers = {int(m.group(1)) for n in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", n))}
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=max(layers) + 1,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="sdpa",
    )


def embedded_tokenizer(tensors: TensorFile) -> bytes | None:
    """The sentencepiece model that ComfyUI stores in its text-encoder files, if this one has it."""
    if TOKENIZER_KEY not in tensors:
        return None
    return tensors.get(TOKENIZER_KEY).to(torch.uint8).numpy().tobytes()
