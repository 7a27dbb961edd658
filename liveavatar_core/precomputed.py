"""Conditioning computed by another host's encoders (ComfyUI's own umT5 and wav2vec2 nodes),
turned into exactly what this package's encoders give, with the official pipeline as the rule.

- Text: ComfyUI's umT5 returns `[1, N, D]` with N >= 512 (its tokens, the end token, then
  padding rows set to zero). The official pipeline keeps only the tokens and the end token
  (`TextEncoder.encode`); the DiT pads with zeros itself. So the zero rows at the end are cut.
  What cannot be undone is refused: a prompt past 512 tokens (the official code truncates the
  tokens before encoding, ComfyUI does not, so every row differs).
- Audio: ComfyUI's wav2vec2 output holds every hidden state at 50 per second, as ours does
  before it is resampled to the video's frames (`audio_encoder.interpolate_to_video_rate`,
  `features_for_video`); the same steps follow here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .audio_encoder import FPS, SAMPLE_RATE, features_for_video, interpolate_to_video_rate
from .audio_io import is_silent
from .conditioning import FEATURE_DTYPE, EncodedAudio, PromptEmbeddings, _playable_track
from .errors import InputError
from .text_tokenizer import TEXT_LEN


def context_from_padded(embeddings: torch.Tensor, name: str = "conditioning", width: int | None = None) -> torch.Tensor:
    """`[1, N, D]` (or `[N, D]`) with zero rows after the real tokens -> `[L, D]` float32, L <= 512."""
    if (
        not torch.is_tensor(embeddings)
        or embeddings.dim() not in (2, 3)
        or (embeddings.dim() == 3 and embeddings.shape[0] != 1)
    ):
        shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
        raise InputError(f"{name}: expected one prompt's text embeddings [1, tokens, width], got {shape}.")
    rows = embeddings.reshape(-1, embeddings.shape[-1]).float().cpu()
    if width is not None and rows.shape[-1] != width:
        raise InputError(
            f"{name}: {rows.shape[-1]}-wide text embeddings, but the diffusion model takes {width}. Load the "
            "umT5-XXL text encoder with Load CLIP (type wan): other CLIP models do not fit."
        )
    nonzero = rows.abs().amax(dim=-1).gt(0).nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 0
    if length == 0:
        raise InputError(f"{name}: the text embeddings are all zeros; encode a prompt with CLIP Text Encode.")
    if length > TEXT_LEN:
        raise InputError(
            f"{name}: the prompt is {length} tokens long; the model reads at most {TEXT_LEN}. The official pipeline "
            "cuts the tokens before encoding, which ComfyUI's encoder does not, so shorten the prompt (or encode it "
            "with LiveAvatar Encode Prompt, which cuts it as the official code does)."
        )
    return rows[:length].contiguous()


def prompt_from_contexts(
    positive: torch.Tensor, negative: torch.Tensor | None = None, width: int | None = None
) -> PromptEmbeddings:
    """PromptEmbeddings from padded embeddings of the prompt and (optionally) the negative prompt."""
    return PromptEmbeddings(
        context_from_padded(positive, "positive", width),
        None if negative is None else context_from_padded(negative, "negative", width),
    )


def encoded_audio_from_hidden_states(
    states: Sequence[torch.Tensor] | torch.Tensor,
    waveform: torch.Tensor,
    sample_rate: int,
    expected_states: int | None = None,
    expected_width: int | None = None,
    name: str = "audio_encoder_output",
) -> EncodedAudio:
    """`EncodedAudio` from wav2vec2's hidden states at 50 per second (`[1, T50, C]` each, the
    embedding output first, the last after the final norm) and the waveform they came from."""
    layers = [torch.as_tensor(s) for s in states]
    if not layers or any(s.dim() != 3 or s.shape[0] != 1 for s in layers):
        raise InputError(f"{name}: expected wav2vec2 hidden states [1, frames, width] per layer.")
    stacked = torch.cat(layers)  # [L, T50, C]
    if expected_states is not None and stacked.shape[0] != expected_states:
        raise InputError(
            f"{name}: {stacked.shape[0]} hidden states, but the diffusion model reads {expected_states}. Load "
            "wav2vec2-large english (wav2vec2_large_english*.safetensors) with Load Audio Encoder."
        )
    if expected_width is not None and stacked.shape[-1] != expected_width:
        raise InputError(
            f"{name}: {stacked.shape[-1]}-wide audio features, but the diffusion model takes {expected_width}. Load "
            "wav2vec2-large english (wav2vec2_large_english*.safetensors) with Load Audio Encoder."
        )
    track = _playable_track(waveform)
    if is_silent(track):
        raise InputError(
            "audio is silent (its peak is below -80 dBFS), so there is no speech to drive the face. "
            "Check the file or its volume; for a still speaker, use a recording of room noise."
        )
    expected_frames = round(track.shape[-1] * SAMPLE_RATE / sample_rate) // 320
    if abs(stacked.shape[1] - expected_frames) > 2:
        raise InputError(
            f"{name} covers {stacked.shape[1] / 50:.2f} s but the audio lasts {track.shape[-1] / sample_rate:.2f} s: "
            "encode the same audio that goes into this node."
        )
    features = features_for_video(interpolate_to_video_rate(stacked).float(), FPS)
    return EncodedAudio(features.to("cpu", FEATURE_DTYPE), track, int(sample_rate))
