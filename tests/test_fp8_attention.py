"""fp8 attention (backends "fa3-fp8" and "fp8-emulated"): e4m3 queries, keys and values with a
scale per head, close to float32 attention; the FlashAttention-3 call gets exactly the inputs
the emulation dequantises; e4m3 caches are read as they lie."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error
from liveavatar_core.dit import attention as dispatch
from liveavatar_core.dit.fp8_attention import FP8, Fp8Heads, emulated_attention, quantize_per_head
from liveavatar_core.dit.kernels import Kernels, use
from liveavatar_core.streaming.caches import HEADROOM, Fp8HeadKVCache

# e4m3 keeps 3 mantissa bits: each value is off by up to 1/16 of itself (2.7% rms), which no
# scale removes; for zero-mean random values at unit logit spread, attention ends ~4.5% off.
FP8_ATTENTION_BOUND = 0.06


def spread_heads(seed: int = 0):
    """q, k, v [1, L, 8, 128] whose heads' sizes span 10^-3..10^3 (values) and 10^-1.5..10^1.5
    (queries, keys; their logits keep a spread of about 1): far outside e4m3's full-precision
    range of 2^-6..448 on either side without scales."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.logspace(-3, 3, 8)[None, None, :, None]

    def heads(tokens, sizes):
        return torch.randn(1, tokens, 8, 128, generator=gen) * sizes

    return heads(128, 2.83 / size.sqrt()), heads(1024, size.sqrt() / 128**0.25), heads(1024, size)


def float64_attention(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2)


def worst_head_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    per_head = torch.linalg.vector_norm(actual - expected, dim=(0, 1, 3)) / torch.linalg.vector_norm(
        expected, dim=(0, 1, 3)
    )
    return per_head.max().item()


def unit_scaled(x):
    return Fp8Heads(x.clamp(-448, 448).to(FP8), torch.ones(x.shape[0], x.shape[2]))


def test_per_head_scales_keep_every_head_close_where_unit_scales_do_not():
    q, k, v = spread_heads()
    exact = float64_attention(q, k, v)
    per_head = emulated_attention(*(quantize_per_head(x) for x in (q, k, v)))
    unit = emulated_attention(*(unit_scaled(x) for x in (q, k, v)))
    errors = relative_error(per_head, exact), worst_head_error(per_head, exact), worst_head_error(unit, exact)
    print(
        f"\nfp8 attention vs float64: per-head scales {errors[0]:.3f} (worst head {errors[1]:.3f}); unit {errors[2]:.3f}"
    )
    assert errors[0] < FP8_ATTENTION_BOUND and errors[1] < FP8_ATTENTION_BOUND
    assert errors[2] > 5 * errors[1]


def test_fp8_backend_quantises_queries_per_call_and_takes_e4m3_keys_as_they_are():
    """The backend's output is the emulation of q, k, v each quantised with its heads' amax,
    whether k and v come as tensors or already in e4m3; in q's dtype, heads flattened."""
    q, k, v = spread_heads(1)
    expected = emulated_attention(*(quantize_per_head(x) for x in (q, k, v))).flatten(2)
    with use(Kernels(attention="fp8-emulated")):
        from_tensors = dispatch.attention(q, k, v)
        from_e4m3 = dispatch.attention(q, quantize_per_head(k), quantize_per_head(v))
    assert from_tensors.dtype == torch.float32 and from_tensors.shape == (1, 128, 8 * 128)
    assert torch.equal(from_tensors, expected) and torch.equal(from_e4m3, expected)


def test_other_backends_dequantise_e4m3_keys():
    q, k, v = spread_heads(2)
    k8, v8 = quantize_per_head(k), quantize_per_head(v)
    with use(Kernels(attention="math")):
        out = dispatch.attention(q, k8, v8)
    expected = float64_attention(q, k8.dequantize(torch.float32), v8.dequantize(torch.float32)).flatten(2)
    assert relative_error(out, expected) <= 1e-5


def test_flash_attention_3_gets_e4m3_inputs_and_their_per_head_descales(monkeypatch):
    """FlashAttention-3's fp8 forward is given e4m3 q/k/v, the cache's keys untouched, and
    [batch, heads] float32 descales; computed from exactly those, its output is the emulation's."""
    seen = {}

    def fake_fa3(q, k, v, q_descale=None, k_descale=None, v_descale=None):
        seen.update(q=q, k=k, descales=(q_descale, k_descale, v_descale))
        inputs = [Fp8Heads(x, s) for x, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        return emulated_attention(*inputs).to(torch.bfloat16), None

    monkeypatch.setattr(dispatch, "_fa3", lambda: fake_fa3)
    monkeypatch.setattr(dispatch, "_fa3_runs_on", lambda q: True)
    q, k, v = spread_heads(3)
    k8 = quantize_per_head(k)
    with use(Kernels(attention="fa3-fp8")):
        out = dispatch.attention(q, k8, v)
    assert seen["q"].dtype == seen["k"].dtype == FP8 and seen["k"] is k8.data
    assert all(s.dtype == torch.float32 and s.shape == (1, 8) for s in seen["descales"])
    expected = emulated_attention(quantize_per_head(q), k8, quantize_per_head(v)).to(torch.bfloat16)
    assert torch.equal(out, expected.float().flatten(2))


def test_fa3_fp8_is_refused_when_flash_attention_3_does_not_import(monkeypatch):
    monkeypatch.setattr(dispatch, "_fa3", lambda: None)
    with pytest.raises(ValueError, match="'fa3-fp8' needs FlashAttention-3"):
        Kernels(attention="fa3-fp8")


def test_head_cache_quantises_later_blocks_into_its_first_scales_saturating():
    """The ring's scale per head is fixed at the first write (sink and first block, times the
    headroom); a later block far larger saturates at +-448 scales instead of turning to NaN."""
    gen = torch.Generator().manual_seed(4)
    cache = Fp8HeadKVCache(num_layers=1, frames=4, tokens_per_frame=3)
    sink = torch.randn(1, 5, 2, 16, generator=gen)
    first = torch.randn(1, 6, 2, 16, generator=gen)
    keys, _ = cache.write_and_read_with_sink(0, 0, 2, first, first, sink, sink)
    scale = keys.scale.clone()
    torch.testing.assert_close(
        scale, torch.maximum(*(x.abs().amax(dim=(1, 3)) for x in (first, sink))) * HEADROOM / 448
    )
    assert relative_error(keys.dequantize(torch.float32), torch.cat([sink, first], dim=1)) < 0.04
    huge = 1000 * HEADROOM * torch.randn(1, 6, 2, 16, generator=gen)
    keys, values = cache.write_and_read_with_sink(0, 2, 2, huge, huge, sink, sink)
    assert torch.equal(keys.scale, scale) and keys.shape == (1, 5 + 12, 2, 16)
    read = keys.dequantize(torch.float32)[:, 5 + 6 :]
    assert torch.isfinite(read).all()
    assert torch.equal(read.abs().amax(dim=(1, 3)), 448 * scale)
    assert keys.data.untyped_storage().data_ptr() == cache._joint[0][0].untyped_storage().data_ptr()
