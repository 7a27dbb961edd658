"""Core ComfyUI types in: the same prompt, VAE and audio through ComfyUI 0.3.75's own nodes and
through ours give the same conditioning and frames (float32, the same tiny files).

ComfyUI's loaders recognise only the full-size umT5 (24 layers of 4096) and wav2vec2 (768 or
1024 wide, 512 conv channels), so for those two the tests build ComfyUI's own classes with the
tiny configuration, as its loader would with the full one. Its VAE loader reads the tiny VAE.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import COMFYUI_DIR, relative_error
from liveavatar_core.default_models import (
    AUDIO_DIM,
    AUDIO_LAYERS,
    DEFAULT_FILES,
    TEXT_DIM,
    UMT5_FF,
    UMT5_HEADS,
    UMT5_LAYERS,
    write_random_models,
)
from liveavatar_core.errors import InputError
from nodes.encode import EncodeAudio, EncodePrompt, LiveAvatarPromptFromConditioning
from nodes.loader import NO_FILE, LoadLiveAvatarModel

PROMPT = "A friendly cartoon character looks straight at the camera and talks."
SPEECH_SECONDS = 3.0


@pytest.fixture(scope="module")
def core(comfyui, tmp_path_factory):
    """ComfyUI's node module (`nodes.py`, imported under another name: ours is `nodes`) with
    its model folders pointed at the tiny files."""
    import folder_paths

    models = tmp_path_factory.mktemp("models")
    paths = write_random_models(models)
    for folder in DEFAULT_FILES:
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    spec = importlib.util.spec_from_file_location("comfy_core_nodes", COMFYUI_DIR / "nodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.paths = paths
    return module


def load_ours(**changes):
    inputs = dict(
        diffusion_model=DEFAULT_FILES["diffusion_models"],
        lora=DEFAULT_FILES["loras"],
        lora_strength=1.0,
        text_encoder=DEFAULT_FILES["text_encoders"],
        vae=DEFAULT_FILES["vae"],
        audio_encoder=DEFAULT_FILES["audio_encoders"],
        weight_dtype="fp32",
        offload_model=False,
        compile=False,
    )
    return LoadLiveAvatarModel().load(**(inputs | changes))[0]


# -- text -------------------------------------------------------------------------------------
def tiny_core_clip(core, tmp_path):
    """A core CLIP object as Load CLIP (type wan) makes it, with the tiny umT5's configuration."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan

    state = load_file(str(core.paths["text_encoders"]))
    config = tmp_path / "umt5_config_tiny.json"
    config.write_text(
        json.dumps(
            {
                "d_ff": UMT5_FF,
                "d_kv": TEXT_DIM // UMT5_HEADS,
                "d_model": TEXT_DIM,
                "num_heads": UMT5_HEADS,
                "num_layers": UMT5_LAYERS,
                "vocab_size": state["shared.weight"].shape[0],
                "dense_act_fn": "gelu_pytorch_tanh",
                "is_gated_act": True,
                "model_type": "umt5",
            }
        )
    )

    class TinyUMT5(comfy.sd1_clip.SDClipModel):  # comfy.text_encoders.wan.UMT5XXlModel, other config
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):  # noqa: B006 (ComfyUI's own signature)
            super().__init__(
                device=device,
                layer=layer,
                layer_idx=layer_idx,
                textmodel_json_config=str(config),
                dtype=dtype,
                special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=True,
                zero_out_masked=True,
                model_options=model_options,
            )

    class TinyWanTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's own signature)
            super().__init__(
                device=device, dtype=dtype, model_options=model_options, name="umt5xxl", clip_model=TinyUMT5
            )

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer, TinyWanTE)
    clip = comfy.sd.CLIP(
        target, tokenizer_data={"spiece_model": state["spiece_model"]}, model_options={"dtype": torch.float32}
    )
    missing, unexpected = clip.load_sd(state)
    assert not missing and not [k for k in unexpected if k != "spiece_model"], (missing, unexpected)
    return clip


@pytest.mark.slow
def test_prompt_through_core_clip_text_encode_equals_encode_prompt(core, tmp_path):
    clip = tiny_core_clip(core, tmp_path)
    models = load_ours()
    negative = "blurry, static, distorted face"
    (positive_cond,) = core.CLIPTextEncode().encode(clip, PROMPT)
    (negative_cond,) = core.CLIPTextEncode().encode(clip, negative)
    assert positive_cond[0][0].shape[1] == 512  # ComfyUI pads to 512 rows of zeros

    (from_core,) = LiveAvatarPromptFromConditioning().convert(models, positive_cond, negative_cond)
    (ours,) = EncodePrompt().encode(models, PROMPT, negative)
    for got, expected in ((from_core.positive, ours.positive), (from_core.negative, ours.negative)):
        assert got.shape == expected.shape  # only the tokens and the end token, as the official code keeps
        print(
            f"prompt embeddings: relative error {relative_error(got, expected):.2e}, max abs difference "
            f"{(got - expected).abs().max().item():.2e} of max abs {expected.abs().max().item():.2f}"
        )
        assert relative_error(got, expected) <= 1e-5


def test_conditioning_past_512_tokens_or_of_another_width_is_refused(core, tmp_path):
    clip = tiny_core_clip(core, tmp_path)
    models = load_ours(text_encoder=NO_FILE)
    (long_cond,) = core.CLIPTextEncode().encode(clip, " ".join([PROMPT] * 60))
    with pytest.raises(InputError, match="at most 512"):
        LiveAvatarPromptFromConditioning().convert(models, long_cond)
    with pytest.raises(InputError, match="4096-wide .* takes 48"):
        LiveAvatarPromptFromConditioning().convert(models, [[torch.ones(1, 512, 4096), {}]])
    with pytest.raises(InputError, match="text_encoder 'none'"):
        EncodePrompt().encode(models, PROMPT, "")


# -- VAE --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_core_vae_in_the_loader_decodes_identically(core):
    (core_vae,) = core.VAELoader().load_vae(DEFAULT_FILES["vae"])
    from_file = load_ours()
    from_core = load_ours(vae=NO_FILE, vae_model=core_vae)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_core.vae.decode(latents), from_file.vae.decode(latents))
    with pytest.raises(InputError, match="vae: pick a file, or connect vae_model"):
        load_ours(vae=NO_FILE)


# -- audio ------------------------------------------------------------------------------------
def tiny_core_audio_encoder():
    """A core AUDIO_ENCODER as Load Audio Encoder makes it, with the tiny wav2vec2's shapes
    (ComfyUI fixes 512 conv channels; the tiny model has 32)."""
    import comfy.audio_encoders.audio_encoders as audio_encoders
    import comfy.audio_encoders.wav2vec2 as w2v

    class TinyWav2Vec2(w2v.Wav2Vec2Model):  # w2v.Wav2Vec2Model.__init__ with conv_dim 32
        def __init__(
            self,
            embed_dim,
            num_heads,
            num_layers,
            conv_norm,
            conv_bias,
            do_normalize,
            do_stable_layer_norm,
            dtype=None,
            device=None,
            operations=None,
        ):
            torch.nn.Module.__init__(self)
            conv_dim = 32
            self.feature_extractor = w2v.ConvFeatureEncoder(
                conv_dim, conv_norm=conv_norm, conv_bias=conv_bias, device=device, dtype=dtype, operations=operations
            )
            self.feature_projection = w2v.FeatureProjection(
                conv_dim, embed_dim, device=device, dtype=dtype, operations=operations
            )
            self.masked_spec_embed = torch.nn.Parameter(torch.empty(embed_dim, device=device, dtype=dtype))
            self.do_normalize = do_normalize
            self.encoder = w2v.TransformerEncoder(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_layers=num_layers,
                do_stable_layer_norm=do_stable_layer_norm,
                device=device,
                dtype=dtype,
                operations=operations,
            )

    return audio_encoders, TinyWav2Vec2


@pytest.fixture
def core_audio_encoder(core, monkeypatch):
    audio_encoders, tiny_class = tiny_core_audio_encoder()
    monkeypatch.setattr(audio_encoders, "Wav2Vec2Model", tiny_class)
    encoder = audio_encoders.AudioEncoderModel(
        {
            "model_type": "wav2vec2",
            "embed_dim": AUDIO_DIM,
            "num_heads": 1,
            "num_layers": AUDIO_LAYERS,
            "conv_norm": True,
            "conv_bias": True,
            "do_normalize": True,
            "do_stable_layer_norm": True,
        }
    )
    missing, unexpected = encoder.load_sd(load_file(str(core.paths["audio_encoders"])))
    assert not missing and not unexpected, (missing, unexpected)
    return encoder


def speech(rate: int) -> dict:
    t = np.arange(int(SPEECH_SECONDS * rate)) / rate
    wave = 0.3 * np.sin(2 * math.pi * 180 * t) * (1 + np.sin(2 * math.pi * 3 * t)) + 0.05 * np.sin(
        2 * math.pi * 2400 * t
    )
    return {"waveform": torch.from_numpy(wave).float()[None, None], "sample_rate": rate}


def core_features(audio_encoder, audio):
    from comfy_extras.nodes_audio_encoder import AudioEncoderEncode

    return AudioEncoderEncode.execute(audio_encoder, audio).result[0]


def test_core_audio_encoder_output_gives_our_features(core_audio_encoder):
    models = load_ours()
    audio = speech(16000)
    ours = EncodeAudio().encode(models, audio, 48)
    from_core = EncodeAudio().encode(models, audio, 48, audio_encoder_output=core_features(core_audio_encoder, audio))
    assert from_core[2:] == ours[2:]  # clips and frames
    assert torch.equal(from_core[1]["waveform"], ours[1]["waveform"])
    got, expected = from_core[0].features.float(), ours[0].features.float()
    assert got.shape == expected.shape
    # Both are kept in bfloat16 (the DiT's input precision): equal up to one bfloat16 rounding.
    assert (got - expected).abs().max().item() <= 2**-8 * expected.abs().max().item()


def test_core_audio_encoder_in_the_loader_gives_identical_features(core_audio_encoder):
    from_file = load_ours()
    from_core = load_ours(audio_encoder=NO_FILE, audio_encoder_model=core_audio_encoder)
    audio = speech(24000)
    assert torch.equal(
        EncodeAudio().encode(from_core, audio, 48)[0].features, EncodeAudio().encode(from_file, audio, 48)[0].features
    )


def test_audio_encoder_output_of_other_audio_is_refused(core_audio_encoder):
    models = load_ours()
    other = core_features(core_audio_encoder, speech(16000) | {"waveform": speech(16000)["waveform"][..., :16000]})
    with pytest.raises(InputError, match="encode the same audio"):
        EncodeAudio().encode(models, speech(16000), 48, audio_encoder_output=other)


# 16 kHz: the same samples in, so the same features. Other rates: ComfyUI resamples with
# torchaudio's filter, the official pipeline (and ours) with soxr_hq.
@pytest.mark.parametrize("rate, bound", [(16000, 1e-5), (48000, 1e-3)])
def test_core_hidden_states_match_ours_in_float32(core_audio_encoder, rate, bound):
    from liveavatar_core.audio_encoder import features_for_video, interpolate_to_video_rate
    from liveavatar_core.audio_io import to_16k_mono

    models = load_ours()
    audio = speech(rate)
    states = torch.cat(core_features(core_audio_encoder, audio)["encoded_audio_all_layers"])
    got = features_for_video(interpolate_to_video_rate(states).float())
    expected = models.audio_encoder.features_for_video(to_16k_mono(audio["waveform"], rate))
    print(
        f"audio features at {rate} Hz: relative error {relative_error(got, expected):.2e}, max abs difference "
        f"{(got - expected).abs().max().item():.2e} of max abs {expected.abs().max().item():.2f}"
    )
    assert relative_error(got, expected) <= bound
