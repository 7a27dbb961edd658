"""EncodeAudio and EncodePrompt: ComfyUI's AUDIO and text into what the sampler conditions on."""

from __future__ import annotations

from liveavatar_core.errors import InputError
from liveavatar_core.generation import encode_audio, encode_prompt

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
                "infer_frames": ("INT", {
                    "default": 48, "min": 4, "max": 480, "step": 4,
                    "tooltip": "Frames per clip, as set on the sampler; only used for num_clip."}),
            }
        }

    def encode(self, model, audio, infer_frames):
        if not isinstance(audio, dict) or "waveform" not in audio:
            raise InputError("audio: connect an AUDIO output (e.g. Load Audio).")
        encoded = encode_audio(model, audio["waveform"], int(audio["sample_rate"]), name="audio")
        num_clip = encoded.clips_needed(infer_frames)
        frames = encoded.video_frames(num_clip, infer_frames)
        track = encoded.track_for_frames(frames)[None].contiguous()
        return (encoded, {"waveform": track, "sample_rate": encoded.sample_rate}, num_clip, frames)


class EncodePrompt:
    DISPLAY_NAME = "LiveAvatar Encode Prompt"
    DESCRIPTION = "Encodes the prompt (and the negative prompt used by guidance) with umT5-XXL."
    CATEGORY = CATEGORY
    RETURN_TYPES = (PROMPT,)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("Text embeddings for LiveAvatar Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "prompt": ("STRING", {
                    "multiline": True, "default": DEFAULT_PROMPT,
                    "tooltip": "Describe the speaker, their expression and the scene; up to 512 tokens."}),
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What to avoid; only used when sample_guide_scale > 0. Empty = Wan2.2's default "
                               "negative prompt."}),
            }
        }

    def encode(self, model, prompt, negative_prompt):
        return (encode_prompt(model, prompt, negative_prompt),)
