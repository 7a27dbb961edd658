"""LiveAvatarSampler: checks the inputs (`RunSpec.make`) and hands a video stream to Online VAE
Decode.

Nothing is generated here: the decode node pulls the stream block by block, so generation and
decoding interleave and each frame leaves memory once written.
"""

from __future__ import annotations

from liveavatar_core.errors import InputError
from liveavatar_core.generation import job_for
from liveavatar_core.run_spec import RunSpec
from liveavatar_core.semantics import SEMANTICS, VideoSemantics
from liveavatar_core.sizing import OFFICIAL_SIZES, SIZE_MODES
from liveavatar_core.streaming import SamplerSettings
from liveavatar_core.streaming.sampler import NOISE_SOURCES
from liveavatar_core.streaming.solvers import SOLVERS

from .types import AUDIO_FEATURES, CATEGORY, MODEL_INPUT, PROMPT, VIDEO_STREAM

MAX_SEED = 2**53 - 1  # the canvas stores numbers as doubles
MAX_GPUS = 16
# The sampler's attention caches: on the GPU, or in system RAM (the low-VRAM mode).
KV_CACHE_CHOICES = {"gpu": "device", "system RAM (low VRAM)": "host"}


class LiveAvatarSampler:
    DISPLAY_NAME = "LiveAvatar Sampler"
    DESCRIPTION = (
        "LiveAvatar's streaming sampler: clip after clip, in causal blocks of 3 latent frames with "
        "key/value caches, for as long as the audio lasts. Connect it to Online VAE Decode, which runs it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (VIDEO_STREAM,)
    RETURN_NAMES = ("video_stream",)
    OUTPUT_TOOLTIPS = ("The video to generate; Online VAE Decode runs it and decodes as it goes.",)
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The portrait (any size). 'exact' size mode scales it to cover the output "
                        "size and crops the centre; nothing is stretched. Only the first image of a "
                        "batch is used."
                    },
                ),
                "audio_features": (AUDIO_FEATURES, {"tooltip": "From LiveAvatar Encode Audio."}),
                "prompt": (PROMPT, {"tooltip": "From LiveAvatar Encode Prompt."}),
                "size": (
                    list(OFFICIAL_SIZES),
                    {
                        "default": "688*368",
                        "tooltip": "Output width*height (the official sizes; through the API any multiples of 16). "
                        "688*368 and 704*384 are what LiveAvatar was tuned for.",
                    },
                ),
                "size_mode": (
                    list(SIZE_MODES),
                    {
                        "default": "exact",
                        "tooltip": "exact: the video has exactly this size (image scaled to cover, centre "
                        "cropped). official_area: as the official CLI, the size is a pixel budget and "
                        "the image's aspect ratio sets the shape (sides multiples of 64).",
                    },
                ),
                "num_clip": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 100000,
                        "tooltip": "Clips to generate (48 frames = 1.92 s each at 48 infer_frames). 0 = as many as "
                        "the audio needs.",
                    },
                ),
                "sample_steps": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 50,
                        "tooltip": "Denoising steps per block; the distilled model uses 3-5 (4 is the official "
                        "setting).",
                    },
                ),
                "infer_frames": (
                    "INT",
                    {
                        "default": 48,
                        "min": 4,
                        "max": 480,
                        "step": 4,
                        "tooltip": "Video frames per clip, a multiple of 4 (48 official, 32 for quick previews).",
                    },
                ),
                "sample_solver": (
                    list(SOLVERS),
                    {"default": "euler", "tooltip": "euler is LiveAvatar's own; dpmpp_2m is an alternative."},
                ),
                "sample_guide_scale": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 20.0,
                        "step": 0.1,
                        "tooltip": "Classifier-free guidance (negative prompt + silenced audio). 0 = off, the "
                        "official setting and twice as fast.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "Same inputs and seed give the same video.",
                    },
                ),
                "trim_to_audio": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Stop the video where the audio ends; off renders every clip, with silence "
                        "past the audio.",
                    },
                ),
            },
            # Optional, so API prompts written before it existed still run (on one process).
            "optional": {
                "gpus": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_GPUS,
                        "tooltip": "1 = this ComfyUI process. N > 1 = N worker processes, one per GPU, each "
                        "running some of the denoising steps; the last also decodes (the official "
                        "layout is 5 GPUs for 4 steps; more than sample_steps + 1 leaves some idle). "
                        "Workers load their own copy of the diffusion model and VAE and stay warm "
                        "between runs; changing the model or gpus restarts them, gpus = 1 ends them. "
                        "Works with offload_model on or off; on is best, so this process's own copy "
                        "waits in RAM instead of on the first GPU beside worker 0's. On a machine "
                        "without GPUs, N CPU processes are used (only useful for testing).",
                    },
                ),
                "semantics": (
                    list(SEMANTICS),
                    {
                        "default": SEMANTICS[0],
                        "tooltip": "Which official LiveAvatar pipeline the video reproduces exactly (motion context, "
                        "sink roll, decode). official-multi-gpu: the paper's real-time streaming path "
                        "(any gpus value; cheap). official-single-gpu: the official single-GPU script; "
                        "every clip re-decodes and re-encodes a 365-frame motion window (slower).",
                    },
                ),
                "sink_roll": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "official-single-gpu only: after clip 0, its first frame becomes the sink's "
                        "reference (the official --enable_online_decode). Off = the official single-GPU "
                        "script's default. official-multi-gpu always rolls.",
                    },
                ),
                "noise": (
                    list(NOISE_SOURCES),
                    {
                        "default": NOISE_SOURCES[0],
                        "tooltip": "cpu: the same noise for a seed on every machine. official: drawn as the "
                        "official code does on a GPU, so a seed reproduces an official CLI video.",
                    },
                ),
                "kv_cache": (
                    list(KV_CACHE_CHOICES),
                    {
                        "default": "gpu",
                        "tooltip": "Where the attention caches of earlier frames live. They are large (38 GB at "
                        "688*368 with 4 steps): 'system RAM (low VRAM)' keeps them in pinned system RAM "
                        "and streams one layer at a time to the GPU, beside the computation. With the "
                        "loader's weight_dtype fp8_e4m3fn and offload_model on, Standard fits in a 24 GB "
                        "card. Same video either way (with gpus > 1, in every worker).",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, size):
        # Any width*height on the 16-pixel grid works, not only the listed ones (API prompts
        # may ask for e.g. 512*512); the sampler checks it and says what is wrong.
        return True

    def prepare(
        self,
        model,
        image,
        audio_features,
        prompt,
        size,
        size_mode,
        num_clip,
        sample_steps,
        infer_frames,
        sample_solver,
        sample_guide_scale,
        seed,
        trim_to_audio,
        gpus=1,
        semantics=SEMANTICS[0],
        sink_roll=True,
        noise=NOISE_SOURCES[0],
        kv_cache="gpu",
    ):
        if kv_cache not in KV_CACHE_CHOICES:
            raise InputError(f"kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {kv_cache!r}.")
        settings = SamplerSettings(
            sample_steps=sample_steps,
            infer_frames=infer_frames,
            sample_solver=sample_solver,
            guide_scale=sample_guide_scale,
            seed=seed,
            noise=noise,
        )
        spec = RunSpec.make(
            image,
            audio_features.features,
            prompt.positive,
            size,
            settings,
            num_clip=num_clip or None,
            negative_context=prompt.negative,
            trim_to_audio=trim_to_audio,
            semantics=VideoSemantics(semantics, sink_roll=sink_roll),
            kv_cache=KV_CACHE_CHOICES[kv_cache],
            gpus=gpus,
            size_mode=size_mode,
        )
        return (job_for(model, spec, audio_features),)
