"""The attention dispatch: every kernel it can pick computes the same attention."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error
from liveavatar_core.dit import attention as dispatch
from liveavatar_core.dit.kernels import Kernels, use


def reference(q, k, v):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math", "flash"])
def test_every_cpu_backend_computes_the_same_attention(backend):
    """Queries and keys of different lengths (a block attending to its cache and sink), float32."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, 32, generator=gen) for n in (24, 57, 57))
    with use(Kernels(attention=backend)):
        out = dispatch.attention(q, k, v)
    assert out.shape == (1, 24, 4 * 32)
    assert relative_error(out, reference(q, k, v)) <= 1e-5


def test_masked_attention_ignores_masked_keys():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 16, generator=gen) for n in (8, 20, 20))
    mask = torch.zeros(8, 20, dtype=torch.bool)
    mask[:, :12] = True
    with use(Kernels(attention="math")):
        masked = dispatch.attention(q, k, v, mask)
    assert relative_error(masked, reference(q, k[:, :12], v[:, :12])) <= 1e-5


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend must be one of"):
        Kernels(attention="xformers")


def test_flash_attention_3_is_refused_when_it_does_not_import(monkeypatch):
    monkeypatch.setattr(dispatch, "_fa3", lambda: None)
    with pytest.raises(ValueError, match="FlashAttention-3"):
        Kernels(attention="fa3")


def test_flash_attention_3_comes_from_either_package_name(monkeypatch, tmp_path):
    """The upstream build is `flash_attn_interface`; the forward-only fa3-fwd wheel names its
    module `fa3_fwd_interface`: either one is found."""
    (tmp_path / "fa3_fwd_interface.py").write_text("def flash_attn_func(q, k, v):\n    return 'fa3-fwd'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    dispatch._fa3.cache_clear()
    try:
        assert dispatch._fa3()(None, None, None) == "fa3-fwd"
    finally:
        dispatch._fa3.cache_clear()
