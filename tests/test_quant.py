"""Quantizer contract: error falls with bits, exact bpw, codes round trip, batched experts = per expert.

Run: .venv/bin/python -m pytest -q tests/test_quant.py
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixprec.core.errors import QuantConfigError
from mixprec.quant import QuantConfig, QuantizedWeight, get_quantizer, storage_bits

BITS = (2, 3, 4, 5, 6, 7, 8)


def _weight(rows: int = 96, cols: int = 192, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # heavy-ish tails like real weights: a Student-t mixture
    w = torch.randn(rows, cols, generator=generator) * 0.02
    return w + 0.05 * torch.randn(rows, cols, generator=generator) ** 3 * 0.02


def _rel_err(w: torch.Tensor, q: QuantizedWeight) -> float:
    return float(((q.dequantize() - w) ** 2).sum() / (w**2).sum())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_error_falls_strictly_as_bits_rise(symmetric: bool, group_size: int) -> None:
    w = _weight()
    errors = [_rel_err(w, get_quantizer(QuantConfig(bits=b, group_size=group_size, symmetric=symmetric)).quantize(w))
              for b in BITS]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_clip_search_never_worse_than_plain_scales() -> None:
    w = _weight()
    for bits in BITS:
        searched = _rel_err(w, get_quantizer(QuantConfig(bits=bits)).quantize(w))
        plain = _rel_err(w, get_quantizer(QuantConfig(bits=bits, clip_search=False)).quantize(w))
        assert searched <= plain + 1e-12, (bits, searched, plain)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(8, 64), (5, 100), (3, 17)])
def test_exact_bit_accounting(symmetric: bool, shape: tuple[int, int]) -> None:
    """codes b bits each, one fp16 scale (+ b-bit zero) per group, partial last group included."""
    for bits in (2, 3, 8):
        config = QuantConfig(bits=bits, group_size=32, symmetric=symmetric)
        q = get_quantizer(config).quantize(torch.randn(shape))
        groups = shape[0] * math.ceil(shape[1] / 32)
        expected = shape[0] * shape[1] * bits + groups * (16 + (0 if symmetric else bits))
        assert q.storage_bits() == storage_bits(config, shape) == expected
        assert q.scales.shape == (shape[0], math.ceil(shape[1] / 32))
        assert config.bits_per_weight(shape) == expected / (shape[0] * shape[1])
    assert QuantConfig(bits=4, group_size=64).bits_per_weight((64, 128)) == 4.25


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_dequantize_formula(symmetric: bool) -> None:
    w = _weight(16, 128)
    for bits in BITS:
        q = get_quantizer(QuantConfig(bits=bits, symmetric=symmetric)).quantize(w)
        assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float16
        assert int(q.codes.max()) <= 2**bits - 1
        zero = q.zeros.float() if q.zeros is not None else torch.full_like(q.scales.float(), 2 ** (bits - 1))
        manual = (q.codes.float().view(16, 2, 64) - zero.unsqueeze(-1)) * q.scales.float().unsqueeze(-1)
        torch.testing.assert_close(q.dequantize(), manual.view(16, 128), rtol=0, atol=0)


def test_codes_round_trip_through_safetensors(tmp_path) -> None:
    q = get_quantizer(QuantConfig(bits=3, symmetric=False)).quantize(_weight())
    save_file({"codes": q.codes, "scales": q.scales, "zeros": q.zeros}, tmp_path / "q.safetensors")
    back = load_file(tmp_path / "q.safetensors")
    again = QuantizedWeight(back["codes"], back["scales"], back["zeros"], 3, 64)
    assert torch.equal(again.dequantize(), q.dequantize())


def test_requantizing_dequantized_weights_is_a_fixed_point() -> None:
    """A matrix already on the grid quantizes back to exactly the same values (no drift through stages)."""
    config = QuantConfig(bits=4, clip_search=False)
    first = get_quantizer(config).quantize(_weight()).dequantize()
    second = get_quantizer(config).quantize(first).dequantize()
    torch.testing.assert_close(second, first, rtol=0, atol=1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_batched_experts_equal_each_expert_alone(symmetric: bool) -> None:
    experts = torch.stack([_weight(32, 64, seed=e) * (e + 1) for e in range(4)])
    quantizer = get_quantizer(QuantConfig(bits=3, symmetric=symmetric))
    batched = quantizer.quantize_experts(experts)
    for e, q in enumerate(batched):
        alone = quantizer.quantize(experts[e])
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
        assert (q.zeros is None and alone.zeros is None) or torch.equal(q.zeros, alone.zeros)


def test_symmetric_two_bit_uses_all_four_levels() -> None:
    """Plain absmax makes 2-bit symmetric ternary; the signed scale must use level -2 as well."""
    q = get_quantizer(QuantConfig(bits=2)).quantize(_weight(64, 256))
    assert set(q.codes.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(group_size=48), dict(method="nope"),
                                    dict(clip_grid=1)])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(QuantConfigError) as info:
        QuantConfig(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)
