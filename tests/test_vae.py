"""The Wan2.1 VAE: every release of its weights loads, it matches ComfyUI's own Wan VAE, latents
are normalised with the official constants, and chunked (streaming) decode equals whole decode."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from conftest import FIXTURES, relative_error
from liveavatar_core.errors import CheckpointError, InputError
from liveavatar_core.tensor_files import TensorFile
from liveavatar_core.vae import WanVAE, latent_frame_count, load_vae, video_frame_count
from liveavatar_core.vae_keys import vae_shape, vae_tensors_in_diffusers_names, wan_to_diffusers_names
from liveavatar_core.weights import build_empty, check_tensor_names

TOLERANCE = 1e-5
SMALL_DIM = 16  # same structure as the real VAE (base width 96), 36x fewer channels squared

# From the official Wan2.1 VAE code (Wan2_1_VAE.__init__).
OFFICIAL_MEAN = [
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
]
OFFICIAL_STD = [
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
]


def official_vae_shapes() -> dict[str, tuple[int, ...]]:
    rows = (line.rstrip("\n").split("\t") for line in (FIXTURES / "vae_keys.tsv").read_text().splitlines())
    return {key: tuple(ast.literal_eval(shape)) for key, shape in rows}


def meta_tensor_file(shapes: dict[str, tuple[int, ...]], label: str = "Wan2.1_VAE.pth") -> TensorFile:
    """A TensorFile of empty (meta) tensors: the names and shapes of a real file, no memory."""
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    return TensorFile(label, {key: (label, key) for key in state}, {label: state})


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that keep activations near unit scale (norm gains near 1, small biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.05 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
    return module.eval()


def random_video(frames: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1


def random_latents(frames: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, height, width, generator=generator)


@pytest.fixture(scope="module")
def small_vae() -> WanVAE:
    """A small random VAE built straight from diffusers (no file, no ComfyUI)."""
    return WanVAE(randomize(AutoencoderKLWan(base_dim=SMALL_DIM)).requires_grad_(False))


# -- key conversion -------------------------------------------------------------------------
def test_converter_maps_official_keys_onto_diffusers_model():
    official = official_vae_shapes()
    assert len(official) == 194
    view = vae_tensors_in_diffusers_names(meta_tensor_file(official))
    model = build_empty(lambda: AutoencoderKLWan(base_dim=vae_shape(view).base_dim))
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    check_tensor_names(expected, view, "Wan2.1 VAE")  # raises on missing / unexpected / mis-shaped
    assert set(view.keys()) == set(expected) and len(expected) == 194
    mapping = wan_to_diffusers_names(official)
    assert mapping["decoder.upsamples.4.shortcut.weight"] == "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    assert mapping["conv1.weight"] == "quant_conv.weight" and mapping["conv2.weight"] == "post_quant_conv.weight"


def test_comfyui_wan_vae_uses_the_official_names(comfyui):
    from comfy.ldm.wan.vae import WanVAE as ComfyWanVAE

    with torch.device("meta"):
        comfy_vae = ComfyWanVAE(dim=96, z_dim=16, temperal_downsample=[False, True, True])
    comfy_shapes = {k: tuple(v.shape) for k, v in comfy_vae.state_dict().items()}
    assert comfy_shapes == official_vae_shapes()


# -- equality with ComfyUI's Wan VAE ---------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_reference(comfyui, tmp_path_factory):
    """ComfyUI's own Wan2.1 VAE (small, random), its files in every layout, and its outputs."""
    from comfy.latent_formats import Wan21
    from comfy.ldm.wan.vae import WanVAE as ComfyWanVAE

    comfy_vae = randomize(ComfyWanVAE(dim=SMALL_DIM, z_dim=16, temperal_downsample=[False, True, True]))
    state = {k: v.contiguous() for k, v in comfy_vae.state_dict().items()}
    folder = tmp_path_factory.mktemp("vae_files")
    files = {
        "official .pth": folder / "Wan2.1_VAE.pth",
        "ComfyUI .safetensors": folder / "wan_2.1_vae.safetensors",
        "whole-model file, vae. prefix": folder / "wan_all_in_one.safetensors",
    }
    torch.save(state, files["official .pth"])
    save_file(state, files["ComfyUI .safetensors"])
    whole = {f"vae.{k}": v for k, v in state.items()}
    whole["model.diffusion_model.patch_embedding.weight"] = torch.zeros(4, 16, 1, 2, 2)
    save_file(whole, files["whole-model file, vae. prefix"])
    diffusers_state = {k: v.contiguous() for k, v in load_vae(files["official .pth"]).model.state_dict().items()}
    files["diffusers names"] = folder / "diffusion_pytorch_model.safetensors"
    save_file(diffusers_state, files["diffusers names"])

    video = random_video(9, 48, 64)
    latents = random_latents(3, 6, 8)
    latent_format = Wan21()
    with torch.no_grad():
        expected_latents = latent_format.process_in(comfy_vae.encode(video))
        expected_video = comfy_vae.decode(latent_format.process_out(latents)).clamp(-1, 1)
    # Random weights must still give an image mostly inside [-1, 1], or clamping would hide errors.
    assert (expected_video.abs() < 1).float().mean() > 0.8
    return files, video, latents, expected_latents, expected_video


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("official .pth", marks=pytest.mark.slow),
        "ComfyUI .safetensors",
        "whole-model file, vae. prefix",
        pytest.param("diffusers names", marks=pytest.mark.slow),
    ],
)
def test_matches_comfyui_wan_vae(comfy_reference, layout):
    files, video, latents, expected_latents, expected_video = comfy_reference
    vae = load_vae(files[layout])
    encoded = vae.encode(video)
    decoded = vae.decode(latents)
    assert encoded.shape == (1, 16, 3, 6, 8) and decoded.shape == (1, 3, 9, 48, 64)
    encode_error = relative_error(encoded, expected_latents)
    decode_error = relative_error(decoded, expected_video)
    print(f"\n[{layout}] encode rel err {encode_error:.3e}, decode rel err {decode_error:.3e}")
    assert encode_error <= TOLERANCE
    assert decode_error <= TOLERANCE


@pytest.mark.slow
def test_loads_in_bfloat16_close_to_float32(comfy_reference):
    files, video, _, expected_latents, _ = comfy_reference
    vae = load_vae(files["ComfyUI .safetensors"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    encoded = vae.encode(video)
    assert encoded.dtype == torch.float32
    error = relative_error(encoded, expected_latents)
    print(f"\nbfloat16 encode rel err {error:.3e}")
    assert error < 3e-2


# -- normalisation ---------------------------------------------------------------------------
def test_latent_normalisation_uses_official_constants(small_vae):
    assert torch.equal(small_vae.latents_mean, torch.tensor(OFFICIAL_MEAN))
    assert torch.equal(small_vae.latents_std, torch.tensor(OFFICIAL_STD))
    mu = random_latents(2, 3, 4) * 3
    normalised = small_vae.normalize_latents(mu)
    mean = torch.tensor(OFFICIAL_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(OFFICIAL_STD).view(1, 16, 1, 1, 1)
    by_hand = relative_error(normalised, (mu - mean) / std)
    round_trip = relative_error(small_vae.denormalize_latents(normalised), mu)
    print(f"\nnormalise vs (mu - mean) / std rel err {by_hand:.3e}, round trip rel err {round_trip:.3e}")
    assert by_hand <= 1e-6 and round_trip <= 1e-6
    # Channel order matters: a latent at the mean of channel 7 only normalises to 0 there.
    at_mean = mean.expand(1, 16, 1, 1, 1).clone()
    assert small_vae.normalize_latents(at_mean).abs().max() < 1e-6


def test_encode_returns_normalised_posterior_mean(small_vae):
    video = random_video(5, 16, 24)
    raw = small_vae.model.encode(video).latent_dist.mean
    error = relative_error(small_vae.encode(video), small_vae.normalize_latents(raw))
    print(f"\nencode vs normalised posterior mean rel err {error:.3e}")
    assert error <= TOLERANCE


def test_frame_counts():
    assert [latent_frame_count(n) for n in (1, 5, 48 + 1, 81)] == [1, 2, 13, 21]
    assert [video_frame_count(n) for n in (0, 1, 2, 12)] == [0, 1, 5, 45]


def test_encode_rejects_video_it_would_truncate(small_vae):
    with pytest.raises(InputError, match=r"1 \+ 4k frames.*got 8.*Trim the video to 5 frames or pad it to 9"):
        small_vae.encode(random_video(8, 16, 16))
    with pytest.raises(InputError, match="multiples of 8; got 16x20"):
        small_vae.encode(random_video(5, 16, 20))
    with pytest.raises(InputError, match=r"\[batch, 3, frames, height, width\]"):
        small_vae.encode(random_video(5, 16, 16)[0])


# -- streaming decode ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("chunks", [(1, 3, 2), (2, 4), (1, 1, 1, 1, 1, 1)])
def test_streaming_decode_equals_whole_decode(small_vae, chunks):
    latents = random_latents(sum(chunks), 4, 6)
    whole = small_vae.decode(latents)
    pieces = []
    with small_vae.streaming_decoder() as decoder:
        start = 0
        for size in chunks:
            piece = decoder.decode_next(latents[:, :, start : start + size])
            # The caches live in the decoder, so other work on the VAE between chunks is harmless.
            small_vae.decode(random_latents(2, 4, 6, seed=9))
            expected_frames = video_frame_count(size) if start == 0 else 4 * size
            assert piece.shape == (1, 3, expected_frames, 32, 48)
            pieces.append(piece)
            start += size
        assert decoder.frames_decoded == whole.shape[2] == video_frame_count(sum(chunks))
    error = relative_error(torch.cat(pieces, dim=2), whole)
    print(f"\nstreaming decode in chunks {chunks}: rel err {error:.3e}")
    assert error <= TOLERANCE
    # The stream must really use its caches: decoding the last chunk alone gives other frames.
    alone = small_vae.decode(latents[:, :, -chunks[-1] :])
    assert relative_error(alone[:, :, -4:], whole[:, :, -4:]) > 1e-3


def test_streaming_decoder_refuses_other_video_and_use_after_close(small_vae):
    decoder = small_vae.streaming_decoder()
    decoder.decode_next(random_latents(1, 4, 6))
    with pytest.raises(InputError, match="does not continue the video"):
        decoder.decode_next(random_latents(1, 4, 4))
    assert decoder.decode_next(random_latents(0, 4, 6)).shape == (1, 3, 0, 32, 48)
    decoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        decoder.decode_next(random_latents(1, 4, 6))


# -- bad files -------------------------------------------------------------------------------
def test_truncated_file_is_reported(tmp_path, small_vae):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({k: v.contiguous() for k, v in small_vae.model.state_dict().items()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or incomplete.*download it again") as info:
        load_vae(path)
    assert str(path) in str(info.value)


def test_missing_tensor_is_reported(tmp_path, small_vae):
    state = {k: v.contiguous() for k, v in small_vae.model.state_dict().items()}
    del state["decoder.conv_out.weight"]
    path = tmp_path / "partial_vae.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\).*decoder\.conv_out\.weight"):
        load_vae(path)


OTHER_NETWORKS = {
    "umT5 (ComfyUI / transformers names)": (
        {
            "shared.weight": (32, 8),
            "encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8),
            "encoder.final_layer_norm.weight": (8,),
        },
        "umT5 text encoder.*models/text_encoders",
    ),
    "umT5 (official names)": (
        {"token_embedding.weight": (32, 8), "blocks.0.attn.q.weight": (8, 8)},
        "umT5 text encoder.*models/text_encoders",
    ),
    "S2V DiT": (
        {"patch_embedding.weight": (8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (8, 8)},
        "diffusion model.*models/diffusion_models",
    ),
    "Wan2.2 VAE": (
        {
            "decoder.middle.0.residual.0.gamma": (8, 1, 1, 1),
            "decoder.upsamples.0.upsamples.0.residual.2.weight": (8, 8, 3, 3, 3),
        },
        "Wan2.2 VAE \\(48 latent channels",
    ),
    "Wan2.2 VAE (diffusers names)": (
        {"decoder.mid_block.resnets.0.norm1.gamma": (8, 1, 1, 1), "post_quant_conv.weight": (48, 48, 1, 1, 1)},
        "Wan2.2 VAE \\(48 latent channels",
    ),
    "unknown": ({"foo.weight": (2, 2)}, "does not hold the Wan2.1 VAE"),
}


@pytest.mark.parametrize("network", list(OTHER_NETWORKS))
def test_other_network_given_as_vae_is_named(tmp_path, network):
    shapes, pattern = OTHER_NETWORKS[network]
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_vae(path)
    message = str(info.value)
    print(f"\n[{network}] {message}")
    assert message.startswith(str(path)) and "Wan2.1_VAE.pth" in message and "wan_2.1_vae.safetensors" in message
