"""The S2V DiT against outputs of the official Wan2.2 reference code, and its checkpoint files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, OFFICIAL_TINY, ROOT, relative_error
from liveavatar_core.dit import S2VConfig, WanS2VTransformer, load_dit, save_dit
from liveavatar_core.dit import attention as dispatch
from liveavatar_core.dit.kernels import Kernels
from liveavatar_core.dit.kernels import current as current_kernels
from liveavatar_core.errors import CheckpointError
from liveavatar_core.lora import merge_lora

TINY_DIR = OFFICIAL_TINY / "Wan2.2-S2V-tiny"
TINY_LORA = OFFICIAL_TINY / "liveavatar-tiny.safetensors"
TOLERANCE = 1e-5


def predict(model: WanS2VTransformer, golden) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            golden["x"][None],
            golden["t"],
            [golden["context"]],
            golden["ref"][None],
            golden["motion"][None],
            golden["audio"],
            cond=golden["cond"][None],
        )
    return out[0]


@pytest.fixture(scope="module")
def official_model():
    return load_dit(TINY_DIR, dtype=torch.float32)


@pytest.mark.slow
def test_expected_keys_of_14b_match_the_real_checkpoint():
    result = subprocess.run(
        [sys.executable, "-m", "liveavatar_core.checkpoints", "expected-keys", "dit"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    ours = set(result.stdout.splitlines())
    reference = set((FIXTURES / "wan22_s2v_14b_keys.tsv").read_text().splitlines())
    assert len(reference) == 1260
    assert ours == reference


def test_full_size_config_has_16_3_billion_parameters():
    from liveavatar_core.checkpoints import dit_expected_shapes

    total = sum(torch.Size(s).numel() for s in dit_expected_shapes().values())
    assert total == 16_295_755_609


def test_official_layout_reproduces_official_output(official_model, golden):
    config = official_model.config
    assert (config.dim, config.num_layers, config.num_heads) == (256, 6, 2)
    assert config.audio_inject_layers == (0, 2, 4, 5)
    error = relative_error(predict(official_model, golden), golden["out_base"])
    print(f"\nDiT vs official out_base: relative error {error:.3e}")
    assert error <= TOLERANCE


def test_each_model_runs_with_its_own_kernel_choices(official_model, golden, monkeypatch):
    """Kernel choices are options of a model, not of the process: a second model held to the
    math attention kernel uses it in its calls only, and both give the official output."""
    held = []
    real = dispatch._sdpa_kernel
    monkeypatch.setattr(dispatch, "_sdpa_kernel", lambda name: held.append(name) or real(name))
    other = load_dit(TINY_DIR, dtype=torch.float32)
    other.kernels = Kernels(attention="math")
    assert relative_error(predict(other, golden), golden["out_base"]) <= TOLERANCE
    assert held and set(held) == {"math"}
    held.clear()
    assert official_model.kernels.attention == "auto"
    assert relative_error(predict(official_model, golden), golden["out_base"]) <= TOLERANCE
    assert held == [], "the other model's choice leaked into this one"
    assert current_kernels().attention == "auto"


def test_lora_merge_reproduces_official_output(golden):
    model = load_dit(TINY_DIR, dtype=torch.float32)
    report = merge_lora(model, TINY_LORA)
    assert (report.merged, report.replaced) == (76, 0)
    error = relative_error(predict(model, golden), golden["out_lora"])
    print(f"\nDiT + LoRA vs official out_lora: relative error {error:.3e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("lora_prefix", ["", "diffusion_model."])
@pytest.mark.slow
def test_lora_variants_with_adapter_names_and_prefixes(tmp_path, golden, lora_prefix):
    renamed = {}
    for key, value in load_file(str(TINY_LORA)).items():
        key = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A.default.weight")
        renamed[lora_prefix + key.replace(".lora_B.weight", ".lora_B.default.weight")] = value
    path = tmp_path / "lora.safetensors"
    save_file(renamed, str(path))
    model = load_dit(TINY_DIR, dtype=torch.float32)
    merge_lora(model, path)
    assert relative_error(predict(model, golden), golden["out_lora"]) <= TOLERANCE


def test_lora_full_tensors_replace_base_weights(tmp_path, official_model):
    replacement = torch.full_like(official_model.trainable_cond_mask.weight, 0.25)
    tensors = load_file(str(TINY_LORA)) | {"base_model.model.trainable_cond_mask.weight": replacement}
    path = tmp_path / "lora_plus.safetensors"
    save_file(tensors, str(path))
    model = load_dit(TINY_DIR, dtype=torch.float32)
    report = merge_lora(model, path)
    assert (report.merged, report.replaced) == (76, 1)
    assert torch.equal(model.trainable_cond_mask.weight, replacement)


def test_lora_of_another_model_is_refused(tmp_path, official_model):
    path = tmp_path / "other.safetensors"
    save_file(
        {"unet.down.0.lora_A.weight": torch.zeros(4, 8), "unet.down.0.lora_B.weight": torch.zeros(8, 4)}, str(path)
    )
    with pytest.raises(CheckpointError, match="other.safetensors.*do not exist"):
        merge_lora(official_model, path)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.slow
def test_single_file_layouts_give_the_same_output(tmp_path, official_model, golden, prefix, dtype):
    state = {prefix + k: v.to(dtype) for k, v in load_dit(TINY_DIR, dtype=torch.float32).state_dict().items()}
    path = tmp_path / "wan2.2_s2v_tiny.safetensors"
    save_file(state, str(path))
    # A ComfyUI-style single file carries no config: the heads and injection layers of this
    # non-14B model come from a config.json beside it.
    shutil.copy(TINY_DIR / "config.json", tmp_path / "config.json")
    model = load_dit(path, dtype=torch.float32)
    expected = golden["out_base"]
    if dtype == torch.bfloat16:  # same network with bf16-rounded weights
        rounded = load_dit(TINY_DIR, dtype=torch.bfloat16).float()
        expected = predict(rounded, golden)
    error = relative_error(predict(model, golden), expected)
    print(f"\nsingle file prefix={prefix!r} {dtype}: relative error {error:.3e}")
    assert error <= TOLERANCE


@pytest.mark.slow
def test_file_written_by_us_carries_its_config(tmp_path, official_model, golden):
    path = tmp_path / "model.safetensors"
    save_dit(official_model, path, prefix="model.diffusion_model.")
    model = load_dit(path, dtype=torch.float32)
    assert model.config == official_model.config
    assert relative_error(predict(model, golden), golden["out_base"]) <= TOLERANCE


def test_other_small_config_is_detected_from_shapes(tmp_path):
    config = S2VConfig(
        dim=128,
        ffn_dim=256,
        num_heads=1,
        num_layers=3,
        text_dim=32,
        audio_dim=24,
        audio_inject_layers=(0, 2),
        freq_dim=64,
    )
    torch.manual_seed(0)
    model = WanS2VTransformer(config)
    path = tmp_path / "small.safetensors"
    save_dit(model, path)
    loaded = load_dit(path, dtype=torch.float32)
    assert loaded.config == config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_bf16_model_stays_close_to_float32(official_model, golden):
    model = load_dit(TINY_DIR, dtype=torch.bfloat16)
    error = relative_error(predict(model, golden), golden["out_base"])
    print(f"\nbf16 DiT vs float32 reference: relative error {error:.3e}")
    assert error < 0.05


def test_unknown_layout_without_config_is_a_clear_error(tmp_path, official_model):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in official_model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="config.json"):
        load_dit(path)


def test_truncated_file_names_the_file_and_the_fix(tmp_path):
    source = next(TINY_DIR.glob("*00001-of-*.safetensors"))
    data = source.read_bytes()
    path = tmp_path / "wan2.2_s2v_14B_bf16.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="wan2.2_s2v_14B_bf16.safetensors.*download it again"):
        load_dit(path)


def test_checkpoint_of_another_model_family_is_refused(tmp_path):
    # A Wan text-to-video DiT: same blocks, no audio or motion modules.
    state = {
        "patch_embedding.weight": torch.zeros(64, 16, 1, 2, 2),
        "blocks.0.ffn.0.weight": torch.zeros(128, 64),
        "head.head.weight": torch.zeros(64, 64),
    }
    path = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="wan2.1_t2v_1.3B.safetensors.*not a Wan2.2-S2V"):
        load_dit(path)


def test_missing_tensors_are_listed(tmp_path, official_model):
    state = {k: v.contiguous() for k, v in official_model.state_dict().items() if "frame_packer" not in k}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path), metadata={"liveavatar_dit_config": official_model.config.to_json()})
    with pytest.raises(CheckpointError, match=r"partial.safetensors.*6 missing tensor\(s\).*frame_packer"):
        load_dit(path)


def test_missing_shard_is_named(tmp_path):
    folder = tmp_path / "Wan2.2-S2V-tiny"
    shutil.copytree(TINY_DIR, folder)
    victim = sorted(folder.glob("*.safetensors"))[3]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"1 shard file.*{victim.name}"):
        load_dit(folder)


def test_model_trains_and_gives_the_same_output_with_autograd(official_model, golden):
    # The default model's training backpropagates through the audio injectors, which add in
    # place at inference: with autograd on they must give the same output and a gradient.
    model = load_dit(TINY_DIR, dtype=torch.float32).requires_grad_(True)
    with torch.enable_grad():
        out = model(
            golden["x"][None],
            golden["t"],
            [golden["context"]],
            golden["ref"][None],
            golden["motion"][None],
            golden["audio"],
            cond=golden["cond"][None],
        )[0]
        out.square().mean().backward()
    assert torch.equal(out.detach(), predict(model, golden))
    injector = next(p for name, p in model.named_parameters() if name.startswith("audio_injector."))
    assert injector.grad is not None and injector.grad.abs().sum() > 0
