"""LoadLiveAvatarModel: the four networks (+ the LiveAvatar LoRA) from ComfyUI's model folders."""

from __future__ import annotations

from liveavatar_core.audio_encoder import audio_encoder_from_tensors
from liveavatar_core.errors import InputError
from liveavatar_core.models import WEIGHT_DTYPES, ModelFiles, load_models
from liveavatar_core.tensor_files import tensors_in_memory
from liveavatar_core.vae import vae_from_tensors

from . import comfy_bridge
from .types import CATEGORY, MODEL

NO_LORA = "none"
NO_FILE = "none"  # for the networks that may come from core loaders instead


class LoadLiveAvatarModel:
    DISPLAY_NAME = "Load LiveAvatar Model"
    DESCRIPTION = (
        "Loads the Wan2.2-S2V-14B diffusion model with the LiveAvatar LoRA merged in, the umT5 text "
        "encoder, the Wan 2.1 VAE and the wav2vec2 audio encoder. Accepts the official files and "
        "ComfyUI's repackaged ones; the model's configuration is read from the file."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("All LiveAvatar networks, ready for the encode and sampler nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = comfy_bridge.model_files
        return {
            "required": {
                "diffusion_model": (
                    files("diffusion_models"),
                    {
                        "tooltip": "models/diffusion_models: wan2.2_s2v_14B_*.safetensors, or any shard of the "
                        "official Wan2.2-S2V-14B folder (the whole folder is loaded)."
                    },
                ),
                "lora": (
                    [NO_LORA] + files("loras"),
                    {
                        "tooltip": "models/loras: liveavatar.safetensors, the distilled few-step LiveAvatar weights. "
                        "'none' runs the plain S2V model (needs many more steps)."
                    },
                ),
                "lora_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -2.0,
                        "max": 2.0,
                        "step": 0.05,
                        "tooltip": "How much of the LoRA to merge; 1.0 is what LiveAvatar was trained for.",
                    },
                ),
                "text_encoder": (
                    files("text_encoders") + [NO_FILE],
                    {
                        "tooltip": "models/text_encoders: umt5_xxl_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled."
                        "safetensors or the official models_t5_umt5-xxl-enc-bf16.pth. 'none' loads no "
                        "umT5: encode prompts with core Load CLIP (type wan) + CLIP Text Encode and "
                        "LiveAvatar Prompt From Conditioning instead (one umT5 in memory, not two)."
                    },
                ),
                "vae": (
                    files("vae") + [NO_FILE],
                    {
                        "tooltip": "models/vae: wan_2.1_vae.safetensors or the official Wan2.1_VAE.pth "
                        "(not the Wan 2.2 VAE). Ignored when vae_model is connected."
                    },
                ),
                "audio_encoder": (
                    files("audio_encoders") + [NO_FILE],
                    {
                        "tooltip": "models/audio_encoders: wav2vec2_large_english*.safetensors, or the official "
                        "wav2vec2-large-xlsr-53-english model file. Ignored when audio_encoder_model "
                        "is connected."
                    },
                ),
                "weight_dtype": (
                    list(WEIGHT_DTYPES),
                    {
                        "default": "bf16",
                        "tooltip": "Weight precision of the diffusion model and text encoder. bf16 is what the "
                        "model was trained in; fp8_e4m3fn halves the diffusion model's memory and is "
                        "faster on RTX 40xx / H100 and newer (ComfyUI's *_fp8_scaled files load as they "
                        "are); fp32 only for checking numbers.",
                    },
                ),
                "offload_model": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Keep idle networks in system RAM: the encoders visit the GPU only while they "
                        "run, the diffusion model and VAE only while a video is made. Saves VRAM "
                        "between runs; costs the transfer time each run.",
                    },
                ),
            },
            "optional": {
                "compile": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Compile the diffusion model's element-wise work into fused GPU kernels "
                        "(torch.compile): about 1.3x faster at 688*368 and up. The first run compiles "
                        "for a minute. Small sizes such as 384*256 run faster with it off. Applies to this "
                        "model (and to its worker processes when gpus > 1).",
                    },
                ),
                "vae_model": (
                    "VAE",
                    {
                        "tooltip": "Optional: the Wan 2.1 VAE from core Load VAE, used instead of the vae file "
                        "(its weights are copied into LiveAvatar's streaming decoder: the same video)."
                    },
                ),
                "audio_encoder_model": (
                    "AUDIO_ENCODER",
                    {
                        "tooltip": "Optional: wav2vec2 from core Load Audio Encoder, used instead of the "
                        "audio_encoder file (its weights are copied: the same features)."
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, diffusion_model, lora, text_encoder, vae, audio_encoder, **_):
        # ComfyUI reuses the loaded model while this value stays the same: a file replaced on
        # disk (other size or modification time) is loaded again.
        return comfy_bridge.model_file_stamps(
            {
                "diffusion_models": diffusion_model,
                "loras": lora,
                "text_encoders": text_encoder,
                "vae": vae,
                "audio_encoders": audio_encoder,
            }
        )

    @classmethod
    def VALIDATE_INPUTS(cls, diffusion_model, lora, text_encoder, vae, audio_encoder):
        # Names outside the folder lists (API prompts, files added since start-up) are checked
        # when loading, where the error can say which folder the file belongs in.
        return True

    def load(
        self,
        diffusion_model,
        lora,
        lora_strength,
        text_encoder,
        vae,
        audio_encoder,
        weight_dtype,
        offload_model,
        compile=True,
        vae_model=None,
        audio_encoder_model=None,
    ):
        files = ModelFiles(
            dit=comfy_bridge.model_path("diffusion_models", diffusion_model, "diffusion_model"),
            text_encoder=_optional_path("text_encoders", text_encoder, "text_encoder"),
            vae=None if vae_model is not None else _file_or_model("vae", vae, "vae", "vae_model", "Load VAE"),
            audio_encoder=None
            if audio_encoder_model is not None
            else _file_or_model(
                "audio_encoders", audio_encoder, "audio_encoder", "audio_encoder_model", "Load Audio Encoder"
            ),
            lora=None if lora == NO_LORA else comfy_bridge.model_path("loras", lora, "lora"),
            lora_strength=lora_strength,
        )
        device = comfy_bridge.compute_device()
        if not offload_model:
            comfy_bridge.free_memory_for(comfy_bridge.files_size(files), device)
        # Built on the CPU in float32; load_models puts them where the others go, in their dtype.
        core_vae = core_audio = None
        if vae_model is not None:
            core_vae = vae_from_tensors(
                tensors_in_memory("vae_model (core Load VAE)", comfy_bridge.core_vae_weights(vae_model))
            )
        if audio_encoder_model is not None:
            core_audio = audio_encoder_from_tensors(
                tensors_in_memory(
                    "audio_encoder_model (core Load Audio Encoder)",
                    comfy_bridge.core_audio_encoder_weights(audio_encoder_model),
                )
            )
        models = load_models(
            files,
            device=device,
            dtype=weight_dtype,
            offload=offload_model,
            compile_elementwise=compile,
            vae=core_vae,
            audio_encoder=core_audio,
        )
        models.placement = comfy_bridge.ComfyPlacement(offload_model)
        if not offload_model:  # already on the device: ComfyUI counts them as loaded from now on
            resident = [n for n in ("dit", "vae", "text_encoder", "audio_encoder") if getattr(models, n) is not None]
            models.placement.acquire({n: models.module(n) for n in resident}, device)
        return (models,)


def _optional_path(folder: str, name: str, input_name: str):
    return None if name == NO_FILE else comfy_bridge.model_path(folder, name, input_name)


def _file_or_model(folder: str, name: str, input_name: str, model_input: str, core_node: str):
    if name == NO_FILE:
        raise InputError(f"{input_name}: pick a file, or connect {model_input} (from core {core_node}).")
    return comfy_bridge.model_path(folder, name, input_name)
