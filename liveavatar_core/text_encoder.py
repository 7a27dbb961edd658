"""The umT5-XXL text encoder of Wan2.2-S2V: prompts -> text context of the DiT.

The network is transformers' `UMT5EncoderModel` (vocab 256384, d_model 4096, 24 layers,
64 heads of 64, d_ff 10240, gated GELU, a relative position table in every layer). Checkpoint
layouts and their mapping: `text_weights`; tokenisation: `text_tokenizer`.

`TextEncoder.encode` returns one [L_i, 4096] tensor per prompt, trimmed to its real token
count (its tokens plus the end token, at most 512), exactly as Wan's `T5EncoderModel.__call__`.
The DiT pads each one with zeros back to 512 rows before its text projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from .errors import InputError
from .tensor_files import open_tensor_file
from .text_tokenizer import TEXT_LEN, PromptTokenizer, find_tokenizer
from .text_weights import (
    WRONG_FILE_FIX,
    DequantizedTensors,
    config_from_shapes,
    embedded_tokenizer,
    text_encoder_part,
    to_transformers_names,
)
from .weights import build_empty, load_weights


def umt5_xxl_config() -> UMT5Config:
    """The configuration of the full-size umT5-XXL encoder that Wan2.2 uses."""
    shapes = {
        "shared.weight": (256384, 4096),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
        "encoder.block.23.layer.1.layer_norm.weight": (4096,),
    }
    return config_from_shapes(shapes, "umT5-XXL")


def build_umt5_encoder(config: UMT5Config) -> UMT5EncoderModel:
    """A `UMT5EncoderModel` whose only embedding table is `shared` (the encoder's alias of it
    is re-attached once weights are in), so its state dict names each tensor once."""
    model = UMT5EncoderModel(config)
    model.encoder.embed_tokens = None
    return model


class TextEncoder(nn.Module):
    """umT5 encoder plus tokenizer: prompts in, Wan2.2's text context out.

    Args:
        model (`UMT5EncoderModel`): the encoder, loaded.
        tokenizer (`PromptTokenizer`): turns prompts into ids and masks (512 tokens by default).
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PromptTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    @property
    def text_len(self) -> int:
        return self.tokenizer.text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d_model] after the final norm, for every position (padding too)."""
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def encode(self, texts: Sequence[str] | str, pad_to_text_len: bool = True) -> list[torch.Tensor]:
        """Encodes prompts as the official pipeline does: one [L_i, d_model] tensor per prompt,
        where L_i counts its tokens and end token (at most `text_len`), on the model's device.

        `pad_to_text_len=False` pads the batch only to its longest prompt instead of 512 tokens:
        padded keys are masked out and the position bias is relative, so the values are the same
        up to float rounding, for less work (worth it on a CPU).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"The prompt must be text (or a list of texts); got {texts!r:.80}.")
        ids, mask = self.tokenizer(texts, pad_to_text_len=pad_to_text_len)
        hidden = self(ids, mask)
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [row[:n] for row, n in zip(hidden, lengths)]


def load_text_encoder(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> TextEncoder:
    """Loads the umT5-XXL text encoder from any of its releases.

    Args:
        path: Wan's `models_t5_umt5-xxl-enc-bf16.pth`, ComfyUI's `umt5_xxl_fp16.safetensors` /
            `umt5_xxl_fp8_e4m3fn_scaled.safetensors` (fp8 weights are dequantised with their
            scales), a ComfyUI checkpoint holding it under `text_encoders.umt5xxl.transformer.`,
            or transformers-named safetensors (a file, shards' index, or their folder).
        tokenizer_path: the tokenizer folder (or `spiece.model`). By default: the tokenizer stored
            in ComfyUI's file, else `google/umt5-xxl/` beside the checkpoint (official layout).
        device, dtype: where the weights go and their dtype (the official pipeline uses bfloat16).

    Raises:
        CheckpointError: the file is missing, damaged, of another network, or lacks a tokenizer.
    """
    tensors = text_encoder_part(open_tensor_file(path))
    weights = DequantizedTensors(to_transformers_names(tensors))
    config = config_from_shapes(weights.shapes(), tensors.label)
    # The tokenizer first: a missing one fails before gigabytes are read.
    tokenizer = find_tokenizer(path, tokenizer_path, embedded_tokenizer(tensors), TEXT_LEN)
    model = build_empty(lambda: build_umt5_encoder(config))
    load_weights(model, weights, what="umT5-XXL text encoder", device=device, dtype=dtype, fix=WRONG_FILE_FIX)
    model.encoder.embed_tokens = model.shared
    return TextEncoder(model.eval().requires_grad_(False), tokenizer)
