"""Prompt tokenisation for the umT5 text encoder, as Wan2.2's pipeline does it.

Wan cleans each prompt (ftfy's repair, HTML entities unescaped twice, whitespace runs collapsed
to one space, ends trimmed), then tokenises it with the end-of-sequence token appended,
truncated to 512 tokens (the last one stays the end token) and padded with id 0 to 512, with
an attention mask of the real tokens.

Two tokenizer sources give the same ids: the official `google/umt5-xxl/` folder (read with
transformers' `AutoTokenizer`, from disk only), or a bare sentencepiece model, which ComfyUI
stores inside its `umt5_xxl_*.safetensors` files as the `spiece_model` tensor.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path

import regex
import sentencepiece
import torch

from .errors import CheckpointError, InputError

TEXT_LEN = 512
# Where the official download keeps the tokenizer, relative to the checkpoint's folder; the second
# is where a diffusers-style repository keeps it, beside the `text_encoder/` folder.
TOKENIZER_FOLDERS = (("google", "umt5-xxl"), ("tokenizer",), ("..", "tokenizer"))

logger = logging.getLogger(__name__)
_warned_no_ftfy = False


def _repair_unicode(text: str) -> str:
    global _warned_no_ftfy
    try:
        import ftfy
    except ImportError:
        if not _warned_no_ftfy:
            logger.warning(
                "The 'ftfy' package is not installed, so prompts skip the Unicode repair that the "
                "official pipeline applies (curly quotes, mis-decoded text). Install it with "
                "`pip install ftfy` for identical results."
            )
            _warned_no_ftfy = True
        return text
    return ftfy.fix_text(text)


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning of a prompt, the step before tokenising it."""
    text = html.unescape(html.unescape(_repair_unicode(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """Turns prompts into umT5 token ids and the attention mask of their real tokens.

    Args:
        backend: a transformers tokenizer, or a `sentencepiece.SentencePieceProcessor`.
        text_len: the most tokens a prompt keeps (with its end token); also the padded length.
        source: what the tokenizer was read from, for messages.
    """

    def __init__(self, backend, text_len: int = TEXT_LEN, source: str = ""):
        self.backend = backend
        self.text_len = text_len
        self.source = source
        self._is_sentencepiece = isinstance(backend, sentencepiece.SentencePieceProcessor)
        if self._is_sentencepiece and backend.eos_id() < 0:
            raise CheckpointError(f"{source}: the sentencepiece tokenizer defines no end token; it is not umT5's.")

    @classmethod
    def from_folder(cls, folder: str | Path, text_len: int = TEXT_LEN) -> PromptTokenizer:
        """The official tokenizer folder (`google/umt5-xxl/`: tokenizer.json, spiece.model, configs)."""
        from transformers import AutoTokenizer

        try:
            backend = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"{folder}: could not read a tokenizer from this folder ({err}). Use the "
                "google/umt5-xxl folder of the Wan2.2-S2V-14B download."
            ) from None
        return cls(backend, text_len, str(folder))

    @classmethod
    def from_sentencepiece(cls, model: bytes, text_len: int = TEXT_LEN, source: str = "") -> PromptTokenizer:
        """A bare sentencepiece model (the bytes of `spiece.model`, or ComfyUI's `spiece_model`)."""
        try:
            backend = sentencepiece.SentencePieceProcessor(model_proto=model)
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"{source}: holds no valid sentencepiece tokenizer ({err}).") from None
        return cls(backend, text_len, source)

    def __call__(self, texts: Sequence[str], pad_to_text_len: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleans and tokenises `texts`; returns ids and mask, both [len(texts), text_len] int64
        (padded only to the longest prompt when `pad_to_text_len` is False)."""
        cleaned = [clean_prompt(t) for t in texts]
        if self._is_sentencepiece:
            return self._sentencepiece_ids(cleaned, pad_to_text_len)
        out = self.backend(
            cleaned,
            padding="max_length" if pad_to_text_len else "longest",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    def _sentencepiece_ids(self, texts: list[str], pad_to_text_len: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Same result as the transformers tokenizer: truncated to leave room for the end token,
        # which always closes the prompt.
        sp = self.backend
        rows = [sp.encode(t)[: self.text_len - 1] + [sp.eos_id()] for t in texts]
        width = self.text_len if pad_to_text_len else max(len(r) for r in rows)
        pad = max(sp.pad_id(), 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


def find_tokenizer(
    checkpoint: str | Path, tokenizer_path: str | Path | None, embedded: bytes | None, text_len: int = TEXT_LEN
) -> PromptTokenizer:
    """The tokenizer for a text-encoder checkpoint: `tokenizer_path` when given (a folder or a
    sentencepiece `.model` file), else the one stored in the checkpoint, else the official folder
    beside it."""
    checkpoint = Path(checkpoint)
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if path.is_dir():
            return PromptTokenizer.from_folder(path, text_len)
        if path.is_file() and path.suffix == ".model":
            return PromptTokenizer.from_sentencepiece(path.read_bytes(), text_len, str(path))
        if path.is_file() and path.name in ("tokenizer.json", "tokenizer_config.json", "spiece.model"):
            return PromptTokenizer.from_folder(path.parent, text_len)
        raise InputError(
            f"{path}: not a tokenizer. Give the google/umt5-xxl folder of the Wan2.2 download, or its "
            "spiece.model file."
        )
    if embedded is not None:
        return PromptTokenizer.from_sentencepiece(embedded, text_len, f"{checkpoint} (spiece_model)")
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for parts in TOKENIZER_FOLDERS:
        candidate = folder.joinpath(*parts)
        if candidate.is_dir():
            return PromptTokenizer.from_folder(candidate.resolve(), text_len)
    raise CheckpointError(
        f"{checkpoint}: found no tokenizer for this text encoder. The official download keeps it in "
        f"the folder google/umt5-xxl/ beside models_t5_umt5-xxl-enc-bf16.pth: put that folder there, "
        "or give its path as the tokenizer path. (ComfyUI's umt5_xxl_*.safetensors files carry their own.)"
    )
