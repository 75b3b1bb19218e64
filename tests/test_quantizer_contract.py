"""One contract every registered quantizer must keep, run against each of them (new ones included).

Each test is parametrized over `quantizer_names()`, so registering a quantizer enrolls it: its payload
must come back from what a variant file stores (and, for the plain integer-code payload, have codes in
range and exact bit accounting), its error and size must move strictly with the width, it must be
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
    QuantSettings,
    get_quantizer,
    quantizer_class,
    quantizer_names,
    storage_bits,
)

METHODS = quantizer_names()
ROWS, COLS = 48, 160  # 160 is no multiple of 64, 128 or 256: partial last groups are part of the contract
WIDE = 256  # a row length every ggml block size divides, so a ladder's nominal types are what it writes


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


def _configs(method: str, symmetric: bool = True) -> list[QuantConfig]:
    """Every supported width x group size; empty when the method refuses this symmetry (ggml: asymmetric)."""
    cls = quantizer_class(method)
    try:
        QuantSettings(method=method, group_size=cls.supported_group_sizes[0], symmetric=symmetric)
    except QuantConfigError:
        assert not symmetric, f"{method} must accept symmetric settings"
        return []
    return [QuantConfig(method=method, bits=b, group_size=g, symmetric=symmetric)
            for g in cls.supported_group_sizes for b in cls.supported_bits]


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
    size, width = cls.supported_group_sizes[0], cls.supported_bits[0]
    for bits in (1, *SUPPORTED_BITS, 9):
        if bits in cls.supported_bits:
            assert QuantConfig(method=method, bits=bits, group_size=size).bits == bits
        else:
            with pytest.raises(QuantConfigError, match=f"bits={bits}"):
                QuantConfig(method=method, bits=bits, group_size=size)
    for group_size in (16, *SUPPORTED_GROUP_SIZES, 48, 256):
        if group_size in cls.supported_group_sizes:
            assert QuantConfig(method=method, bits=width, group_size=group_size).group_size == group_size
        else:
            with pytest.raises(QuantConfigError, match=f"group_size={group_size}"):
                QuantConfig(method=method, bits=width, group_size=group_size)


@pytest.mark.parametrize("method", METHODS)
def test_needs_hessian_matches_what_quantize_does_without_one(method: str) -> None:
    config = _configs(method)[-1]
    if quantizer_class(method).needs_hessian:
        with pytest.raises(QuantConfigError):
            get_quantizer(config).quantize(_weight())
    else:
        assert get_quantizer(config).quantize(_weight()).dequantize().shape == (ROWS, COLS)


def _check_integer_codes(q: QuantizedWeight, config: QuantConfig) -> None:
    """The plain payload: codes in range, one fp16 scale (+ zero point) per group, exact bits."""
    groups = math.ceil(COLS / config.group_size)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (ROWS, COLS)
    assert int(q.codes.max()) <= 2**config.bits - 1
    assert q.scales.dtype == torch.float16 and q.scales.shape == (ROWS, groups)
    assert (q.zeros is None) == config.symmetric
    if q.zeros is not None:
        assert q.zeros.shape == (ROWS, groups) and int(q.zeros.max()) <= 2**config.bits - 1
    assert (q.bits, q.group_size) == (config.bits, config.group_size)
    assert q.storage_bits() == storage_bits(config, (ROWS, COLS))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_codes_in_range_bits_exact_and_restorable(method: str, symmetric: bool) -> None:
    """Every payload comes back from the tensors a variant file stores; the plain one is checked in full,
    a method's own payload (raw ggml blocks) at least never stores fewer bits than its width."""
    w, h = _weight(), _hessian()
    for config in _configs(method, symmetric):
        quantizer = get_quantizer(config)
        q = quantizer.quantize(w, h)
        if type(q) is QuantizedWeight:
            _check_integer_codes(q, config)
        else:
            assert q.bits == config.bits and q.storage_bits() >= config.bits * ROWS * COLS
        for shape in ((ROWS, COLS), (ROWS, WIDE)):  # planned costs (budget checks, baselines) are exact
            assert storage_bits(config, shape) == quantizer.quantize(torch.randn(shape), _hessian(shape[1])
                                                                     ).storage_bits(), (config, shape)
        values = q.dequantize()
        assert values.shape == (ROWS, COLS) and torch.isfinite(values).all()
        restored = quantizer.restore(q.codes, q.scales, q.zeros, (ROWS, COLS))
        assert torch.equal(restored.dequantize(), values) and restored.storage_bits() == q.storage_bits()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_error_falls_strictly_as_bits_rise(method: str, symmetric: bool) -> None:
    """Weight error, output error and stored bits all move strictly with every extra bit."""
    w, h = _weight(cols=WIDE), _hessian(cols=WIDE)
    configs = _configs(method, symmetric)
    for size in sorted({c.group_size for c in configs}):
        quantized = [_quantize(c, w, h) for c in sorted(configs, key=lambda c: c.bits) if c.group_size == size]
        weight_errors = [float(((q.dequantize() - w) ** 2).sum() / (w**2).sum()) for q in quantized]
        output_errors = [_output_error(w, q, h) for q in quantized]
        for errors in (weight_errors, output_errors):
            assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), (size, errors)
        sizes = [q.storage_bits() for q in quantized]
        assert sizes == sorted(set(sizes)), (size, sizes)
        assert output_errors[0] < 1.0, "even the narrowest width must beat dropping the weights"


@pytest.mark.parametrize("method", METHODS)
def test_same_input_gives_the_same_codes(method: str) -> None:
    config = _configs(method)[0]
    first, second = (_quantize(config, _weight(), _hessian()) for _ in range(2))
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scales, second.scales)
    assert (first.zeros is None) == (second.zeros is None)


@pytest.mark.parametrize("method", METHODS)
def test_experts_equal_each_expert_alone(method: str) -> None:
    experts = torch.stack([_weight(16, WIDE, seed=e) * (e + 1) for e in range(3)])
    hessians = [_hessian(WIDE, seed=e + 10) for e in range(3)]
    quantizer = get_quantizer(_configs(method)[0])
    for q, weight, hessian in zip(quantizer.quantize_experts(experts, hessians), experts, hessians, strict=True):
        alone = quantizer.quantize(weight, hessian)
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
