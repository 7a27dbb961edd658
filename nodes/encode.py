"""EncodeAudio, EncodePrompt and PromptFromConditioning: ComfyUI's AUDIO, text or core
CONDITIONING into what the sampler conditions on."""

from __future__ import annotations

from liveavatar_core.errors import InputError
from liveavatar_core.generation import encode_audio, encode_prompt
from liveavatar_core.precomputed import encoded_audio_from_hidden_states, prompt_from_contexts

from .types import AUDIO_FEATURES, CATEGORY, MODEL_INPUT, PROMPT

DEFAULT_PROMPT = (
    "A person speaks directly to the camera with natural lip movements, gentle head motion and "
    "expressive eyes, in a softly lit room. Realistic, clear, stable framing."
)


class EncodeAudio:
    DISPLAY_NAME = "LiveAvatar Encode Audio"
    DESCRIPTION = "Turns a speech track into wav2vec2 features, one window per video frame at 25 fps."
    CATEGORY = CATEGORY
    RETURN_TYPES = (AUDIO_FEATURES, "AUDIO", "INT", "INT")
    RETURN_NAMES = ("audio_features", "audio", "num_clip", "num_frames")
    OUTPUT_TOOLTIPS = (
        "Speech features for LiveAvatar Sampler.",
        "The speech as it will sound in the video: starting at the video's first frame, cut to the "
        "frames the audio fills (for Create Video or other audio nodes).",
        "Clips needed to cover the audio at this infer_frames (wire it into the sampler's num_clip).",
        "Video frames the generated video will have with num_clip = auto.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "audio": ("AUDIO", {"tooltip": "Any sample rate, mono or stereo, any length (from Load Audio)."}),
                "infer_frames": (
                    "INT",
                    {
                        "default": 48,
                        "min": 4,
                        "max": 480,
                        "step": 4,
                        "tooltip": "Frames per clip, as set on the sampler; only used for num_clip.",
                    },
                ),
            },
            "optional": {
                "audio_encoder_output": (
                    "AUDIO_ENCODER_OUTPUT",
                    {
                        "tooltip": "Optional: core Audio Encoder Encode's output for this same audio (wav2vec2-large "
                        "english from core Load Audio Encoder). It holds all 25 hidden states the model "
                        "reads, so it is used instead of running the loader's audio encoder. Identical "
                        "features for 16 kHz audio; at other rates ComfyUI resamples with torchaudio's "
                        "filter, not the official soxr_hq, so the features differ slightly (see README)."
                    },
                ),
            },
        }

    def encode(self, model, audio, infer_frames, audio_encoder_output=None):
        if not isinstance(audio, dict) or "waveform" not in audio:
            raise InputError("audio: connect an AUDIO output (e.g. Load Audio).")
        if audio_encoder_output is not None:
            encoded = _from_core_features(model, audio, audio_encoder_output)
        else:
            encoded = encode_audio(model, audio["waveform"], int(audio["sample_rate"]), name="audio")
        num_clip = encoded.clips_needed(infer_frames)
        frames = encoded.video_frames(num_clip, infer_frames)
        track = encoded.track_for_frames(frames)[None].contiguous()
        return (encoded, {"waveform": track, "sample_rate": encoded.sample_rate}, num_clip, frames)


class _PromptNode:
    """What both prompt nodes give: embeddings for the sampler."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (PROMPT,)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("Text embeddings for LiveAvatar Sampler.",)


class EncodePrompt(_PromptNode):
    DISPLAY_NAME = "LiveAvatar Encode Prompt"
    DESCRIPTION = "Encodes the prompt (and the negative prompt used by guidance) with umT5-XXL."
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": DEFAULT_PROMPT,
                        "tooltip": "Describe the speaker, their expression and the scene; up to 512 tokens.",
                    },
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid; only used when sample_guide_scale > 0. Empty = Wan2.2's default "
                        "negative prompt.",
                    },
                ),
            }
        }

    def encode(self, model, prompt, negative_prompt):
        if model.text_encoder is None:
            raise InputError(
                "the loader has text_encoder 'none': pick the umT5 file there, or encode the prompt with core "
                "CLIP Text Encode and LiveAvatar Prompt From Conditioning."
            )
        return (encode_prompt(model, prompt, negative_prompt),)


class LiveAvatarPromptFromConditioning(_PromptNode):
    DISPLAY_NAME = "LiveAvatar Prompt From Conditioning"
    DESCRIPTION = (
        "Uses prompts encoded by core CLIP Text Encode with the umT5-XXL of core Load CLIP (type wan), so "
        "the umT5 ComfyUI already holds serves LiveAvatar too. Gives the same embeddings as LiveAvatar "
        "Encode Prompt for plain prompts; see the tooltips for what core's encoder does differently."
    )
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "From CLIP Text Encode with a umT5 CLIP (Load CLIP, type wan). Core's encoder reads "
                        "'(word:1.2)' as a weight and skips the official prompt clean-up (Unicode repair, "
                        "whitespace runs), so for the official result write plain text; at most 512 tokens."
                    },
                ),
            },
            "optional": {
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "The negative prompt, encoded the same way; only needed when sample_guide_scale > 0."},
                ),
            },
        }

    def convert(self, model, positive, negative=None):
        width = model.dit.config.text_dim
        return (
            prompt_from_contexts(
                _one_embedding(positive, "positive"),
                None if negative is None else _one_embedding(negative, "negative"),
                width,
            ),
        )


def _one_embedding(conditioning, name: str):
    """The tensor of a CONDITIONING holding one prompt ([[tensor, {...}]])."""
    if not isinstance(conditioning, list) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise InputError(f"{name}: connect a CONDITIONING output (CLIP Text Encode).")
    if len(conditioning) != 1:
        raise InputError(
            f"{name}: holds {len(conditioning)} combined prompts; LiveAvatar takes one. Connect "
            "CLIP Text Encode directly (no Conditioning Combine)."
        )
    return conditioning[0][0]


def _from_core_features(model, audio: dict, output):
    if not isinstance(output, dict) or "encoded_audio_all_layers" not in output:
        raise InputError("audio_encoder_output: connect core Audio Encoder Encode's output.")
    config = model.dit.config
    return encoded_audio_from_hidden_states(
        output["encoded_audio_all_layers"],
        audio["waveform"],
        int(audio["sample_rate"]),
        config.num_audio_layers,
        config.audio_dim,
    )
