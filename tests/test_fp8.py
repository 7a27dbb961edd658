"""fp8 mode of the DiT: which layers go to fp8, how close it stays to the full-precision model,
and ComfyUI-style scaled-fp8 files loading as fp8 without upcasting."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import OFFICIAL_TINY, relative_error
from liveavatar_core.dit import fp8, load_dit
from liveavatar_core.dit.fp8 import (
    FP8,
    SCALED_FP8_MARKER,
    Fp8Linear,
    dequantize_dit_,
    quantize_dit_,
    set_activation_scaling_,
)
from liveavatar_core.errors import CheckpointError
from test_dit import predict

TINY_DIR = OFFICIAL_TINY / "Wan2.2-S2V-tiny"


def fp8_model():
    return quantize_dit_(load_dit(TINY_DIR, dtype=torch.bfloat16))


@pytest.mark.slow
def test_block_linears_go_to_fp8_and_the_conditioning_layers_stay(golden):
    model = fp8_model()
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Fp8Linear))}
    assert kinds["blocks.0.self_attn.q"] is Fp8Linear
    assert kinds["blocks.0.ffn.2"] is Fp8Linear
    assert kinds["audio_injector.injector.0.k"] is Fp8Linear
    for exempt in (
        "text_embedding.0",
        "time_embedding.0",
        "time_projection.1",
        "head.head",
        "casual_audio_encoder.encoder.final_linear",
    ):
        assert kinds[exempt] is nn.Linear, exempt
    assert model.blocks[0].self_attn.q.weight.dtype == FP8
    # Half the bytes of bf16 for the quantised layers.
    bf16 = load_dit(TINY_DIR, dtype=torch.bfloat16)
    assert model.blocks[0].ffn[0].weight.nbytes * 2 == bf16.blocks[0].ffn[0].weight.nbytes


@pytest.mark.slow
def test_fp8_output_stays_close_to_bf16(golden):
    bf16 = predict(load_dit(TINY_DIR, dtype=torch.bfloat16), golden)
    error = relative_error(predict(fp8_model(), golden), bf16)
    print(f"\nfp8 vs bf16 DiT output: relative error {error:.3e}")
    assert 0 < error < 0.1


@pytest.mark.slow
def test_scaled_fp8_file_loads_as_fp8_without_upcasting(tmp_path, golden):
    quantized = fp8_model()
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in quantized.state_dict().items()}
    state[f"model.diffusion_model.{SCALED_FP8_MARKER}"] = torch.empty(0, dtype=FP8)
    state["model.diffusion_model.blocks.0.self_attn.q.scale_input"] = torch.ones(())
    path = tmp_path / "wan2.2_s2v_tiny_fp8_scaled.safetensors"
    save_file(state, str(path))
    shutil.copy(TINY_DIR / "config.json", tmp_path / "config.json")

    loaded = load_dit(path, dtype=torch.bfloat16)
    assert loaded.blocks[1].cross_attn.v.weight.dtype == FP8
    assert torch.equal(
        loaded.blocks[1].cross_attn.v.weight.view(torch.uint8),
        quantized.blocks[1].cross_attn.v.weight.view(torch.uint8),
    )
    assert torch.equal(predict(loaded, golden), predict(quantized, golden))

    upcast = dequantize_dit_(load_dit(path, dtype=torch.bfloat16))
    assert isinstance(upcast.blocks[1].cross_attn.v, nn.Linear)
    assert relative_error(predict(upcast, golden), predict(quantized, golden)) < 1e-2


def test_fp8_weight_without_fp8_storage_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in fp8_model().state_dict().items()}
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"].to(torch.bfloat16)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    shutil.copy(TINY_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="blocks.0.ffn.0.weight"):
        load_dit(path)


# -- static activation scales ----------------------------------------------------------------------
@pytest.fixture
def fp8_units(monkeypatch):
    """Runs the fp8 layers' real e4m3 path (torch._scaled_mm) on the CPU, as on a Hopper GPU."""
    monkeypatch.setattr(fp8, "has_fp8_matmul", lambda device: True)


def fp8_layer(seed: int = 0) -> Fp8Linear:
    torch.manual_seed(seed)
    return Fp8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))


def test_static_scale_is_the_first_calls_and_then_frozen(fp8_units):
    layer = fp8_layer()
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
    dynamic = layer(x)
    set_activation_scaling_(layer, "static", calibration_calls=2, headroom=1.0)
    assert torch.equal(layer(x * 0.5), set_activation_scaling_(fp8_layer(), "tensor")(x * 0.5))  # calibrating = dynamic
    assert fp8.static_scale(layer) is None
    assert torch.equal(layer(x), dynamic)
    frozen = fp8.static_scale(layer)
    assert frozen is not None and frozen.item() == pytest.approx(x.abs().amax().item() / fp8.FP8_MAX, rel=1e-6)
    # Larger inputs keep the frozen scale: they saturate (never NaN) instead of rescaling.
    louder = layer(x * 3)
    assert fp8.static_scale(layer) is frozen
    assert torch.isfinite(louder).all()
    assert relative_error(louder, dynamic * 3) > 0.01
    # Choosing "static" again calibrates anew.
    set_activation_scaling_(layer, "static", headroom=1.0)
    layer(x * 3)
    assert fp8.static_scale(layer).item() == pytest.approx(3 * frozen.item(), rel=1e-2)


def test_a_pre_cast_input_gives_what_the_layer_computes_itself(fp8_units):
    layer = set_activation_scaling_(fp8_layer(), "static")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x)
    assert isinstance(fp8.quantize_input(layer, x), fp8.Fp8Activation)
    assert torch.equal(layer(fp8.quantize_input(layer, x)), layer(x))
    assert fp8.quantize_input(set_activation_scaling_(fp8_layer(), "tensor"), x) is x


def test_static_scales_stay_close_to_dynamic_ones_in_the_dit(fp8_units, golden):
    model = fp8_model()
    bf16 = predict(load_dit(TINY_DIR, dtype=torch.bfloat16), golden)
    dynamic = predict(model, golden)
    set_activation_scaling_(model, "static")
    calibrating = predict(model, golden)
    assert torch.equal(calibrating, dynamic)
    assert fp8.static_scale(model.blocks[0].self_attn.q) is not None
    static = predict(model, golden)  # now with the fused e4m3 producers and frozen scales
    print(
        f"\nstatic vs dynamic scales: {relative_error(static, dynamic):.3e}; "
        f"vs bf16 {relative_error(static, bf16):.3e} (dynamic {relative_error(dynamic, bf16):.3e})"
    )
    assert 0 < relative_error(static, dynamic) < 0.05
    assert relative_error(static, bf16) < 1.5 * relative_error(dynamic, bf16)


def test_unknown_activation_scaling_is_refused():
    with pytest.raises(ValueError, match="static"):
        set_activation_scaling_(fp8_layer(), "delayed")
