"""One contract every registered quantizer must keep, run against each of them (new ones included).

Each test is parametrized over `quantizer_names()`, so registering a quantizer enrolls it: its codes
must be in range and its bit accounting exact, its error must fall as bits rise, it must be
deterministic, batched experts must equal experts one by one, and its declared traits
(`needs_hessian`, supported widths and group sizes) must match what it really accepts and refuses.

Run: .venv/bin/python -m pytest -q tests/test_quantizer_contract.py
"""

from __future__ import annotations

import math

import pytest
import torch

from mixprec.core.errors import QuantConfigError
from mixprec.quant import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantConfig,
    QuantizedWeight,
    Quantizer,
    get_quantizer,
    quantizer_class,
    quantizer_names,
    storage_bits,
)

METHODS = quantizer_names()
ROWS, COLS = 48, 160  # 160 is no multiple of 64 or 128: partial last groups are part of the contract


def _weight(rows: int = ROWS, cols: int = COLS, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * 0.02
    return w + 0.05 * torch.randn(rows, cols, generator=generator) ** 3 * 0.02


def _hessian(cols: int = COLS, seed: int = 1) -> torch.Tensor:
    """X^T X of correlated inputs with uneven scales, like real activations."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=generator) @ (torch.eye(cols) + 0.3 * torch.randn(
        cols, cols, generator=generator) / math.sqrt(cols))
    x = x * torch.linspace(0.2, 3.0, cols)
    return x.T @ x / x.shape[0]


def _quantize(config: QuantConfig, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
    """Every quantizer gets the Hessian: the ones that need it use it, the others may weight by it."""
    return get_quantizer(config).quantize(weight, hessian)


def _output_error(weight: torch.Tensor, q: QuantizedWeight, hessian: torch.Tensor) -> float:
    """Relative output error tr(E H E^T) / tr(W H W^T): what error-compensating methods minimise."""
    err = q.dequantize() - weight
    return float(torch.trace(err @ hessian @ err.T) / torch.trace(weight @ hessian @ weight.T))


@pytest.mark.parametrize("method", METHODS)
def test_traits_are_declared_on_the_class(method: str) -> None:
    cls = quantizer_class(method)
    assert issubclass(cls, Quantizer) and cls.name == method
    for trait in ("needs_hessian", "supported_bits", "supported_group_sizes"):
        assert trait in vars(cls), f"{cls.__name__} inherits {trait} instead of declaring it"
    assert isinstance(cls.needs_hessian, bool)
    assert cls.supported_bits and set(cls.supported_bits) <= set(SUPPORTED_BITS)
    assert cls.supported_group_sizes and set(cls.supported_group_sizes) <= set(SUPPORTED_GROUP_SIZES)


@pytest.mark.parametrize("method", METHODS)
def test_accepts_exactly_the_declared_widths_and_group_sizes(method: str) -> None:
    cls = quantizer_class(method)
    for bits in (1, *SUPPORTED_BITS, 9):
        if bits in cls.supported_bits:
            assert QuantConfig(method=method, bits=bits).bits == bits
        else:
            with pytest.raises(QuantConfigError, match=f"bits={bits}"):
                QuantConfig(method=method, bits=bits)
    for size in (16, *SUPPORTED_GROUP_SIZES, 48, 256):
        if size in cls.supported_group_sizes:
            assert QuantConfig(method=method, group_size=size).group_size == size
        else:
            with pytest.raises(QuantConfigError, match=f"group_size={size}"):
                QuantConfig(method=method, group_size=size)


@pytest.mark.parametrize("method", METHODS)
def test_needs_hessian_matches_what_quantize_does_without_one(method: str) -> None:
    config = QuantConfig(method=method, bits=4)
    if quantizer_class(method).needs_hessian:
        with pytest.raises(QuantConfigError, match="Hessian"):
            get_quantizer(config).quantize(_weight())
    else:
        q = get_quantizer(config).quantize(_weight())
        assert q.codes.shape == (ROWS, COLS)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_codes_in_range_and_bits_exact(method: str, symmetric: bool) -> None:
    cls, w, h = quantizer_class(method), _weight(), _hessian()
    for size in cls.supported_group_sizes:
        for bits in cls.supported_bits:
            config = QuantConfig(method=method, bits=bits, group_size=size, symmetric=symmetric)
            q = _quantize(config, w, h)
            groups = math.ceil(COLS / size)
            assert q.codes.dtype == torch.uint8 and q.codes.shape == (ROWS, COLS)
            assert int(q.codes.max()) <= 2**bits - 1
            assert q.scales.dtype == torch.float16 and q.scales.shape == (ROWS, groups)
            assert (q.zeros is None) == symmetric
            if q.zeros is not None:
                assert q.zeros.shape == (ROWS, groups) and int(q.zeros.max()) <= 2**bits - 1
            assert (q.bits, q.group_size) == (bits, size)
            assert q.storage_bits() == storage_bits(config, (ROWS, COLS))
            assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_error_falls_strictly_as_bits_rise(method: str, symmetric: bool) -> None:
    """Weight error and output error both fall with every extra bit, at every supported group size."""
    cls, w, h = quantizer_class(method), _weight(), _hessian()
    for size in cls.supported_group_sizes:
        quantized = [_quantize(QuantConfig(method=method, bits=b, group_size=size, symmetric=symmetric), w, h)
                     for b in sorted(cls.supported_bits)]
        weight_errors = [float(((q.dequantize() - w) ** 2).sum() / (w**2).sum()) for q in quantized]
        output_errors = [_output_error(w, q, h) for q in quantized]
        for errors in (weight_errors, output_errors):
            assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), (size, errors)
        assert output_errors[0] < 1.0, "even the narrowest width must beat dropping the weights"


@pytest.mark.parametrize("method", METHODS)
def test_same_input_gives_the_same_codes(method: str) -> None:
    config = QuantConfig(method=method, bits=3, symmetric=False)
    first, second = (_quantize(config, _weight(), _hessian()) for _ in range(2))
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scales, second.scales)
    assert first.zeros is not None and second.zeros is not None and torch.equal(first.zeros, second.zeros)


@pytest.mark.parametrize("method", METHODS)
def test_experts_equal_each_expert_alone(method: str) -> None:
    experts = torch.stack([_weight(16, 64, seed=e) * (e + 1) for e in range(3)])
    hessians = [_hessian(64, seed=e + 10) for e in range(3)]
    quantizer = get_quantizer(QuantConfig(method=method, bits=3))
    for q, weight, hessian in zip(quantizer.quantize_experts(experts, hessians), experts, hessians, strict=True):
        alone = quantizer.quantize(weight, hessian)
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
