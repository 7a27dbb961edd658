"""The tiny default model set, trained by the pack itself, for trying it without downloads.

The five files in `default_model/` ship with the pack; `write_default_models` copies them into
a ComfyUI `models/` folder. `scripts/train_default_model.py` made them (its docstring gives
the two commands): the VAE and the DiT were trained on synthetic talking cartoon faces, the
DiT through our own streaming sampler. It is a small model with little training. Through the
pipeline at 128*128 (tests/test_default_model_talks.py) the video shows the given portrait,
blurred (correlation with it 0.73-0.77; random weights gave about 0), another portrait gives
its own face (0.40 against 0.17 for the example's), and the mouth opens with the speech, but
about 4 frames (one latent) late: the tiny VAE blends each latent's frames with the previous
latent's, so a mouth that opens at frame t shows fully opened only at t + 4 (Pearson of mouth
darkness and loudness 0.59 overall, 0.88 with the 4 frames' shift). For real avatars, download the real
files (see "Model files" in the README) and put them in the same ComfyUI folders:
`diffusion_models/` (Wan2.2-S2V-14B), `loras/` (liveavatar.safetensors), `text_encoders/`
(umT5-XXL), `vae/` (Wan 2.1 VAE) and `audio_encoders/` (wav2vec2-large english).

Every file has the real architecture, the real tensor names and the real file layout (the
one ComfyUI's repackaged files use), only with tiny widths and depths, so each one goes
through the same loaders as the full-size release:

- DiT: dim 128 (4 heads of 32), ffn 256, 4 blocks, an audio injector after each, written by
  `save_dit` (config in the metadata), without a prefix, bfloat16. Trained.
- LoRA: PEFT pairs `base_model.model.<module>.lora_A/B.weight`, rank 4, no alpha tensors,
  float32, with zero up-projections (PEFT's initial state): merging it changes nothing.
- umT5: d_model 48 (= the DiT's text_dim), 2 layers, 2 heads of 24, with its own
  sentencepiece model (trained on a built-in English text) as `spiece_model`, float16;
  seeded random weights (`text_encoder_state(0)`), which the DiT was trained with (the
  tokenizer's pieces depend on the sentencepiece version, one reason the files ship).
- VAE: Wan 2.1 layout, base width 8, 16 latent channels, bfloat16. Trained, its output
  layers scaled so the official latent normalisation gives unit-variance latents.
- wav2vec2: hidden size 64 (= the DiT's audio_dim; 64 features per head is fixed), 2 layers
  (3 hidden states = the DiT's audio layers), float16; seeded random weights
  (`audio_encoder_state(0)`), which the DiT was trained with.

Run `python -m liveavatar_core.default_models --models-dir ComfyUI/models` to copy them.
The builders below (`tiny_dit`, `lora_state`, `text_encoder_state`, `vae_state`,
`audio_encoder_state`) give the seeded random networks the training starts from.
`write_random_models` writes seeded random stand-ins under the same names at the smallest
widths (`RANDOM_DIT`, a VAE of base width 1): the tests of the plumbing run on those, in
seconds, where the trained files take minutes per video on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import io
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic_files import write_atomically
from .dit import S2VConfig, WanS2VTransformer, save_dit

DEFAULT_FILES = {
    "diffusion_models": "liveavatar_tiny_s2v.safetensors",
    "loras": "liveavatar_tiny_lora.safetensors",
    "text_encoders": "umt5_tiny.safetensors",
    "vae": "wan_tiny_vae.safetensors",
    "audio_encoders": "wav2vec2_tiny.safetensors",
}
# The trained files (scripts/train_default_model.py made them), copied out by `write_default_models`.
SHIPPED_DIR = Path(__file__).resolve().parent / "default_model"
# Identifies our files in the metadata (the DiT is recognised by its stored config instead).
MARKER_KEY = "liveavatar_default_model"
FORMAT_VERSION = 1

TEXT_DIM = 48
AUDIO_DIM = 64
AUDIO_LAYERS = 2
TINY_DIT = S2VConfig(
    dim=128,
    ffn_dim=256,
    num_heads=4,
    num_layers=4,
    text_dim=TEXT_DIM,
    audio_dim=AUDIO_DIM,
    num_audio_layers=AUDIO_LAYERS + 1,
    audio_inject_layers=(0, 1, 2, 3),
)
UMT5_HEADS, UMT5_FF, UMT5_LAYERS, UMT5_BUCKETS = 2, 96, 2, 32
VAE_BASE_DIM = 8
# The seeded random stand-ins `write_random_models` writes: the same architectures at the
# smallest widths (the VAE's full-resolution stages dominate a CPU run), for tests of the
# plumbing (loading, streaming, the server, bad input) that must run in seconds, not of the
# pictures. umT5 and wav2vec2 are the shipped ones' builders.
RANDOM_DIT = dataclasses.replace(TINY_DIT, dim=32, ffn_dim=64, num_heads=1, num_layers=2, audio_inject_layers=(0, 1))
RANDOM_VAE_BASE_DIM = 1
LORA_RANK = 4
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
SPIECE_VOCAB = 320  # an upper bound: the trainer stops where the text runs out of pieces

# Distinct generator streams per network, so changing one network leaves the others' bytes alone.
_STREAMS = {"dit": 1, "lora": 2, "text": 3, "vae": 4, "audio": 5}

_TOKENIZER_TEXT = """\
A friendly cartoon character looks straight at the camera and talks.
The person smiles, nods a little and speaks clearly in a calm voice.
Soft studio light falls on the face from the left, the background is plain.
A young woman with short dark hair explains the weather for tomorrow.
An old man with a grey beard tells a short story about the sea.
The presenter greets the audience, then describes the new product in detail.
Natural skin, sharp eyes, gentle head movements, lips in sync with the speech.
Hello and welcome, thank you for watching, see you again next week.
The quick brown fox jumps over the lazy dog while the avatar keeps talking.
Bright colours, high quality, realistic details, a steady camera, no cuts.
Blurry, low quality, distorted face, extra fingers, static image, subtitles.
She laughs, raises her eyebrows and turns her head slightly to the right.
He speaks slowly, his mouth opens wide on every long vowel and closes on m and b.
A teacher in a classroom reads a poem aloud to the children.
The singer holds a long note, eyes closed, in warm evening light.
A news anchor in a dark suit reports from the studio at night.
"""


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 16 + _STREAMS[stream])


def _is_gain(name: str, param: torch.Tensor) -> bool:
    """Scales that multiply a normalised signal, which sit near 1 in a trained network."""
    if name.endswith(("gamma", "original0")) or name == "casual_audio_encoder.weights":
        return True
    return param.ndim == 1 and name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random weights that keep activations near unit scale, drawn in sorted name order so the
    values do not depend on how a library initialises or orders its parameters."""
    for name, param in sorted(module.named_parameters()):
        noise = torch.randn(param.shape, generator=generator)
        if _is_gain(name, param):
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.02 * noise)
        else:
            param.copy_(noise / math.sqrt(param[0].numel()))
    return module.eval().requires_grad_(False)


def _state(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in module.state_dict().items()
    }


# -- the networks -----------------------------------------------------------------------------
def tiny_dit(seed: int = 0, config: S2VConfig = TINY_DIT) -> WanS2VTransformer:
    return randomize(WanS2VTransformer(config), _generator(seed, "dit"))


def lora_state(model: WanS2VTransformer, seed: int = 0) -> dict[str, torch.Tensor]:
    """LiveAvatar's LoRA layout for every targeted linear layer of `model` (small values)."""
    generator = _generator(seed, "lora")
    state = {}
    for name, module in sorted(model.named_modules()):
        # PEFT's rule for target names: the whole name, or its ending after a dot.
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            down = torch.randn(LORA_RANK, module.in_features, generator=generator) / math.sqrt(module.in_features)
            up = 0.05 * torch.randn(module.out_features, LORA_RANK, generator=generator)
            state[f"base_model.model.{name}.lora_A.weight"] = down
            state[f"base_model.model.{name}.lora_B.weight"] = up
    return state


def train_tokenizer() -> bytes:
    """A umT5-style sentencepiece model (pad 0, end 1, unknown 2, no start token)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT.splitlines()),
        model_writer=model,
        vocab_size=SPIECE_VOCAB,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # one thread: the same pieces and scores every time
        minloglevel=2,
    )
    return model.getvalue()


def text_encoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI's umT5 layout (transformers' names) plus the tokenizer as `spiece_model`."""
    import sentencepiece

    from .text_encoder import build_umt5_encoder
    from .text_weights import TOKENIZER_KEY, config_from_shapes

    spiece = train_tokenizer()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    d_kv = TEXT_DIM // UMT5_HEADS
    block = "encoder.block.0.layer."
    config = config_from_shapes(
        {
            "shared.weight": (vocab, TEXT_DIM),
            block + "0.SelfAttention.relative_attention_bias.weight": (UMT5_BUCKETS, UMT5_HEADS),
            block + "0.SelfAttention.q.weight": (UMT5_HEADS * d_kv, TEXT_DIM),
            block + "1.DenseReluDense.wi_0.weight": (UMT5_FF, TEXT_DIM),
            f"encoder.block.{UMT5_LAYERS - 1}.layer.1.layer_norm.weight": (TEXT_DIM,),
        },
        "tiny umT5",
    )
    model = randomize(build_umt5_encoder(config), _generator(seed, "text"))
    state = _state(model, torch.float16)
    state[TOKENIZER_KEY] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return state


def wan_vae_names() -> list[str]:
    """The tensor names of the Wan 2.1 VAE in Wan's own layout (ComfyUI's vae/ files)."""
    residual = (
        "residual.0.gamma",
        "residual.2.weight",
        "residual.2.bias",
        "residual.3.gamma",
        "residual.6.weight",
        "residual.6.bias",
    )
    names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    for part in ("encoder", "decoder"):
        names += [f"{part}.conv1.weight", f"{part}.conv1.bias"]
        names += [f"{part}.middle.{i}.{r}" for i in (0, 2) for r in residual]
        attention = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
        names += [f"{part}.middle.1.{p}" for p in attention]
        names += [f"{part}.head.0.gamma", f"{part}.head.2.weight", f"{part}.head.2.bias"]
    # Encoder: 4 stages of 2 residual blocks, a downsampler after the first three (temporal in
    # the last two); the channel count changes at the first block of stages 2 and 3.
    layout = {
        "encoder.downsamples": ((0, 1, 3, 4, 6, 7, 9, 10), (3, 6), (2, 5, 8), (5, 8)),
        "decoder.upsamples": ((0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14), (4,), (3, 7, 11), (3, 7)),
    }
    for part, (residuals, shortcuts, resamples, time_convs) in layout.items():
        names += [f"{part}.{i}.{r}" for i in residuals for r in residual]
        names += [f"{part}.{i}.shortcut.{p}" for i in shortcuts for p in ("weight", "bias")]
        names += [f"{part}.{i}.resample.1.{p}" for i in resamples for p in ("weight", "bias")]
        names += [f"{part}.{i}.time_conv.{p}" for i in time_convs for p in ("weight", "bias")]
    return names


def vae_state(seed: int = 0, base_dim: int = VAE_BASE_DIM) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKLWan

    from .vae_keys import wan_to_diffusers_names

    model = randomize(AutoencoderKLWan(base_dim=base_dim, z_dim=16), _generator(seed, "vae"))
    ours = _state(model, torch.bfloat16)
    mapping = wan_to_diffusers_names(wan_vae_names())
    if sorted(mapping.values()) != sorted(ours):
        raise RuntimeError(
            "diffusers' AutoencoderKLWan no longer has the Wan 2.1 VAE's tensors; update wan_vae_names()."
        )
    return {wan: ours[diffusers] for wan, diffusers in mapping.items()}


def audio_encoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI's wav2vec2 layout: transformers' `Wav2Vec2Model` names, weight norm as a
    parametrization, `masked_spec_embed` kept; the "large" layout (layer-norm convs)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from .audio_encoder import CONV_STRIDES, HEAD_DIM

    config = Wav2Vec2Config(
        hidden_size=AUDIO_DIM,
        num_hidden_layers=AUDIO_LAYERS,
        num_attention_heads=AUDIO_DIM // HEAD_DIM,
        intermediate_size=4 * AUDIO_DIM,
        conv_dim=(32,) * len(CONV_STRIDES),
        conv_stride=CONV_STRIDES,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        mask_time_prob=0.05,
    )
    model = randomize(Wav2Vec2Model(config), _generator(seed, "audio"))
    return _state(model, torch.float16)


# -- files --------------------------------------------------------------------------------------
def default_model_paths(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Where each file goes: {ComfyUI model folder: path}."""
    root = Path(models_dir)
    return {folder: root / folder / name for folder, name in DEFAULT_FILES.items()}


def write_default_models(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Copies the five shipped files under `models_dir` (ComfyUI's `models/` folder layout) and
    returns {folder: path}. Nothing is downloaded: the files ship with the pack."""
    paths = default_model_paths(models_dir)
    for folder, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp, folder=folder: shutil.copyfile(SHIPPED_DIR / DEFAULT_FILES[folder], tmp))
    return paths


def write_random_models(models_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Writes seeded random stand-ins for the five files (`RANDOM_DIT`, a VAE of base width
    `RANDOM_VAE_BASE_DIM`) under `models_dir`, in the same layout and names as
    `write_default_models`, and returns {folder: path}. The same seed gives byte-identical
    files. Their videos are coloured noise: they exercise the pipeline, not the pictures."""
    paths = default_model_paths(models_dir)
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    dit = tiny_dit(seed, RANDOM_DIT)
    _save(lora_state(dit, seed), paths["loras"], seed)
    write_atomically(paths["diffusion_models"], lambda tmp: save_dit(dit.to(torch.bfloat16), tmp))
    _save(text_encoder_state(seed), paths["text_encoders"], seed)
    _save(vae_state(seed, RANDOM_VAE_BASE_DIM), paths["vae"], seed)
    _save(audio_encoder_state(seed), paths["audio_encoders"], seed)
    return paths


def _save(tensors: dict[str, torch.Tensor], path: Path, seed: int) -> None:
    metadata = {MARKER_KEY: json.dumps({"version": FORMAT_VERSION, "seed": seed})}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def has_default_models(models_dir: str | os.PathLike) -> bool:
    """Whether `models_dir` already holds all five shipped files, byte for byte."""
    for folder, path in default_model_paths(models_dir).items():
        if not (path.is_file() and filecmp.cmp(path, SHIPPED_DIR / DEFAULT_FILES[folder], shallow=False)):
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m liveavatar_core.default_models",
        description="Copy the tiny default LiveAvatar models (trained by the pack) into a ComfyUI models folder.",
    )
    parser.add_argument("--models-dir", required=True, help="ComfyUI's models folder (e.g. ComfyUI/models)")
    parser.add_argument("--skip-existing", action="store_true", help="do nothing when the files are already there")
    args = parser.parse_args(argv)
    if args.skip_existing and has_default_models(args.models_dir):
        print(f"The tiny default models are already in {args.models_dir}.")
        return
    for path in write_default_models(args.models_dir).values():
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print("A tiny model for trying the pack: a blurred portrait whose mouth moves with the speech, not a real avatar.")


if __name__ == "__main__":
    main()
