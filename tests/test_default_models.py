"""The tiny default models (shipped, trained by the pack) and the example media: every file loads with the pack's own
loaders, the networks fit together and run, files are reproducible, the media decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT
from liveavatar_core.audio_encoder import load_audio_encoder
from liveavatar_core.audio_io import SAMPLE_RATE, load_audio
from liveavatar_core.default_models import (
    DEFAULT_FILES,
    RANDOM_DIT,
    RANDOM_VAE_BASE_DIM,
    TINY_DIT,
    audio_encoder_state,
    has_default_models,
    lora_state,
    main,
    text_encoder_state,
    tiny_dit,
    write_default_models,
    write_random_models,
)
from liveavatar_core.dit import load_dit
from liveavatar_core.lora import merge_lora
from liveavatar_core.pipeline import StreamingPipeline
from liveavatar_core.run_spec import RunSpec
from liveavatar_core.streaming import SamplerSettings
from liveavatar_core.text_encoder import load_text_encoder
from liveavatar_core.vae import load_vae

MEDIA = ROOT / "workflows" / "media"
PORTRAIT = MEDIA / "liveavatar_example_portrait.png"
SPEECH = MEDIA / "liveavatar_example_speech.wav"
MAX_MEDIA_BYTES = 300 * 1024


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_default_models(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(models_dir):
    path = {folder: models_dir / folder / name for folder, name in DEFAULT_FILES.items()}
    dit = load_dit(path["diffusion_models"], dtype=torch.float32)
    return {
        "path": path,
        "dit": dit,
        "text": load_text_encoder(path["text_encoders"], dtype=torch.float32),
        "vae": load_vae(path["vae"]),
        "audio": load_audio_encoder(
            path["audio_encoders"],
            expected_hidden_size=dit.config.audio_dim,
            expected_hidden_states=dit.config.num_audio_layers,
        ),
    }


def test_files_sit_in_comfyui_model_folders(models_dir, capsys):
    for folder, name in DEFAULT_FILES.items():
        assert (models_dir / folder / name).is_file()
    assert has_default_models(models_dir)
    damaged = models_dir.parent / "damaged"
    write_default_models(damaged)
    (damaged / "vae" / DEFAULT_FILES["vae"]).write_bytes(b"not a model")
    assert not has_default_models(damaged)
    assert not has_default_models(models_dir / "elsewhere")
    main(["--models-dir", str(models_dir), "--skip-existing"])
    assert "already" in capsys.readouterr().out


def test_networks_load_and_fit_together(loaded):
    dit, text, vae, audio = loaded["dit"], loaded["text"], loaded["vae"], loaded["audio"]
    assert dit.config == TINY_DIT  # the config came back from the file's metadata
    assert text.model.config.d_model == dit.config.text_dim
    assert text.model.config.vocab_size == text.tokenizer.backend.get_piece_size()
    assert (audio.hidden_size, audio.num_hidden_states) == (dit.config.audio_dim, dit.config.num_audio_layers)
    assert vae.model.config.z_dim == dit.config.in_dim == 16

    (context,) = text.encode("A friendly cartoon character talks to the camera.")
    assert context.shape[1] == dit.config.text_dim and torch.isfinite(context).all()
    features = audio.features_for_video(load_audio(SPEECH))
    assert features.shape[:3] == (1, dit.config.num_audio_layers, dit.config.audio_dim)


@pytest.mark.slow
def test_the_pipeline_runs_on_them(loaded):
    text, audio = loaded["text"], loaded["audio"]
    context, negative = text.encode(["a friendly face talking", "blurry"])
    features = audio.features_for_video(load_audio(SPEECH))
    image = torch.from_numpy(np.asarray(Image.open(PORTRAIT).convert("RGB"), dtype=np.float32) / 255)
    # 64*64 is the smallest size: the motion packer's coarsest patch spans 8 latent pixels.
    settings = SamplerSettings(sample_steps=2, infer_frames=4, guide_scale=4.5)
    spec = RunSpec.make(image, features, context, "64*64", settings, num_clip=2, negative_context=negative)
    chunks = list(StreamingPipeline(loaded["dit"], loaded["vae"]).stream(spec))
    frames = torch.cat([c.frames for c in chunks])
    assert frames.shape == (2 * 4 - 3, 64, 64, 3) and torch.isfinite(frames).all()


def test_lora_merges_into_the_dit(loaded):
    dit = load_dit(loaded["path"]["diffusion_models"], dtype=torch.float32)
    before = dit.blocks[0].self_attn.q.weight.clone()
    report = merge_lora(dit, loaded["path"]["loras"])
    # q, k, v, o of self- and cross-attention and ffn.0/2 per block, q, k, v, o per injector.
    assert report.merged == 10 * TINY_DIT.num_layers + 4 * len(TINY_DIT.audio_inject_layers)
    assert report.replaced == 0
    # The shipped LoRA has PEFT's zero up-projections: merged, it leaves the trained DiT as it is.
    assert torch.equal(dit.blocks[0].self_attn.q.weight, before)


def test_shipped_encoders_are_the_seeded_builders(models_dir, tmp_path):
    again = write_default_models(tmp_path)
    for folder, path in again.items():
        assert path.read_bytes() == (models_dir / folder / DEFAULT_FILES[folder]).read_bytes(), folder
    # The DiT was trained on these umT5 and wav2vec2, the builders' seed-0 networks. The umT5's
    # sentencepiece pieces (and so its embedding rows) depend on the sentencepiece version,
    # which is why the files ship instead of being rebuilt; every other tensor is the builder's.
    for folder, state, version_bound in (
        ("text_encoders", text_encoder_state(0), {"spiece_model", "shared.weight"}),
        ("audio_encoders", audio_encoder_state(0), set()),
    ):
        shipped = load_file(str(models_dir / folder / DEFAULT_FILES[folder]))
        assert sorted(shipped) == sorted(state), folder
        assert all(torch.equal(shipped[k], state[k]) for k in state if k not in version_bound), folder
    other = lora_state(tiny_dit(seed=1), seed=1)
    first = lora_state(tiny_dit(seed=0), seed=0)
    assert not all(torch.equal(other[k], first[k]) for k in first)


def test_example_media_decode():
    wave = load_audio(SPEECH)
    assert abs(wave.shape[0] / SAMPLE_RATE - 4.0) < 0.05
    assert 0.05 < wave.abs().max() <= 1.0
    with Image.open(PORTRAIT) as image:
        assert image.size == (512, 640) and image.mode == "RGB"
    for path in (PORTRAIT, SPEECH):
        assert path.stat().st_size < MAX_MEDIA_BYTES


def test_example_media_command_fills_an_input_folder(tmp_path, capsys):
    from liveavatar_core.example_media import main as copy_media

    input_dir = tmp_path / "ComfyUI" / "input"
    copy_media(["--input-dir", str(input_dir)])
    names = {path.name for path in input_dir.iterdir()}
    assert names == {PORTRAIT.name, SPEECH.name}
    assert (input_dir / SPEECH.name).read_bytes() == SPEECH.read_bytes()
    assert str(input_dir / PORTRAIT.name) in capsys.readouterr().out
    # Every file the API presets load is now in input/.
    for workflow in (ROOT / "workflows" / "api").glob("*_api.json"):
        for node in json.loads(workflow.read_text()).values():
            if node["class_type"] in ("LoadImage", "LoadAudio"):
                name = node["inputs"].get("image") or node["inputs"].get("audio")
                assert (input_dir / name).is_file(), f"{workflow.name} loads {name}"
    copy_media(["--input-dir", str(input_dir)])  # a second run leaves the folder as it is
    assert {path.name for path in input_dir.iterdir()} == names


def test_random_stand_ins_are_reproducible_small_and_load(tmp_path, models_dir):
    first, again, other = (write_random_models(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for folder in DEFAULT_FILES:
        assert first[folder].read_bytes() == again[folder].read_bytes(), folder
    assert first["vae"].read_bytes() != other["vae"].read_bytes()
    assert load_dit(first["diffusion_models"], dtype=torch.float32).config == RANDOM_DIT
    assert load_vae(first["vae"]).model.config.base_dim == RANDOM_VAE_BASE_DIM
    # Far smaller than the shipped trained files, which is what keeps the plumbing's tests fast.
    for folder in ("diffusion_models", "vae"):
        assert first[folder].stat().st_size * 3 < (models_dir / folder / DEFAULT_FILES[folder]).stat().st_size, folder
