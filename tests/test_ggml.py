"""ggml quant types as quantizers: libggml's own blocks, exact bits, llama.cpp's shape fallback, variants.

Run: .venv/bin/python -m pytest tests/test_ggml.py -q
Needs llama-cpp-python (libggml) and gguf; runs/setup.sh installs both, so CI runs these tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import gguf  # noqa: E402

from mixprec.core.errors import QuantConfigError  # noqa: E402
from mixprec.model.loading import Checkpoint  # noqa: E402
from mixprec.quant import QuantConfig, get_quantizer  # noqa: E402
from mixprec.quant.ggml import (  # noqa: E402
    LADDERS,
    dequantize_ggml,
    effective_type,
    quantize_ggml,
    type_bits,
)
from mixprec.quant.variants import ensure_variants  # noqa: E402

#: Bits per weight from FIELD.md §5.2 (block bytes x 8 / block size).
EXPECTED_BPW = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5,
                "IQ4_XS": 4.25, "IQ3_S": 3.4375, "IQ2_S": 2.5625, "IQ2_XXS": 2.0625, "IQ1_M": 1.75, "Q4_0": 4.5,
                "Q5_1": 6.0}


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


@pytest.mark.parametrize("name,bpw", sorted(EXPECTED_BPW.items()))
def test_type_bits_are_exact(name: str, bpw: float) -> None:
    assert type_bits(name) == bpw


@pytest.mark.parametrize("bits", sorted(LADDERS["gguf"]))
def test_storage_bits_are_the_blocks_written(bits: int) -> None:
    q = get_quantizer(QuantConfig(method="gguf", bits=bits)).quantize(_weight(8, 512))
    name = LADDERS["gguf"][bits]
    assert q.ggml_type == name
    assert q.storage_bits() == 8 * 512 * type_bits(name)


@pytest.mark.parametrize("cols,asked,written", [(512, "Q4_K", "Q4_K"), (96, "Q2_K", "Q4_0"), (96, "Q3_K", "Q4_0"),
                                                (96, "Q4_K", "Q5_0"), (96, "Q5_K", "Q5_1"), (96, "Q6_K", "Q8_0"),
                                                (96, "IQ4_XS", "IQ4_NL"), (96, "IQ1_M", "IQ4_NL"),
                                                (256, "IQ1_M", "IQ1_M"), (40, "Q4_K", "F16"), (40, "Q8_0", "F16")])
def test_shape_fallback_follows_llama_cpp(cols: int, asked: str, written: str) -> None:
    assert effective_type(asked, cols) == written


def test_fallback_is_what_the_quantizer_writes_and_counts() -> None:
    q = get_quantizer(QuantConfig(method="gguf", bits=4)).quantize(_weight(4, 96))
    assert q.ggml_type == "Q5_0" and q.storage_bits() == 4 * 96 * 5.5


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1"])
def test_ggml_blocks_equal_the_gguf_reference_quantizer(name: str) -> None:
    """The gguf package's numpy quantizer is an independent implementation of these types."""
    w = _weight(6, 256, seed=3)
    ours = quantize_ggml(w, name)
    reference = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(ours, reference)


def test_error_falls_as_the_ladder_rises() -> None:
    w = _weight(16, 512, seed=1)
    errors = [float(((get_quantizer(QuantConfig(method="gguf", bits=b)).quantize(w).dequantize() - w) ** 2).mean())
              for b in sorted(LADDERS["gguf"])]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6


def test_importance_matrix_weights_the_error() -> None:
    """An imatrix that stresses half the columns lowers the error there (the Hessian diagonal's job)."""
    w = _weight(32, 256, seed=2)
    importance = torch.ones(256)
    importance[:128] = 100.0
    plain = dequantize_ggml(quantize_ggml(w, "Q2_K"), "Q2_K", 256)
    weighted = dequantize_ggml(quantize_ggml(w, "Q2_K", importance), "Q2_K", 256)
    err = lambda d: float(((d - w)[:, :128] ** 2).mean())  # noqa: E731
    assert err(weighted) < 0.9 * err(plain)


def test_iq2_needs_an_importance_matrix() -> None:
    quantizer = get_quantizer(QuantConfig(method="gguf-iq", bits=2))
    with pytest.raises(QuantConfigError, match="importance matrix"):
        quantizer.quantize(_weight(4, 256))
    hessian = torch.diag(torch.rand(256) + 0.5)
    assert quantizer.quantize(_weight(4, 256), hessian).ggml_type == "IQ2_XXS"


def test_iq_ladder_width_1_is_iq1_m_with_exact_bits() -> None:
    """gguf-iq's 1-bit rung is IQ1_M, counted at its block size (1.75 bpw), weighted by the imatrix."""
    config = QuantConfig(method="gguf-iq", bits=1)
    assert config.variant_id == "gguf-iq-iq1_m" and 1 not in LADDERS["gguf"] and 1 not in LADDERS["gguf-imatrix"]
    quantizer = get_quantizer(config)
    with pytest.raises(QuantConfigError, match="importance matrix"):
        quantizer.quantize(_weight(4, 256))
    q = quantizer.quantize(_weight(8, 512), torch.diag(torch.rand(512) + 0.5))
    assert q.ggml_type == "IQ1_M" and q.storage_bits() == 8 * 512 * 1.75 == 7168
    assert get_quantizer(config).planned_storage_bits(config, (8, 512)) == q.storage_bits()


def test_iq1_m_round_trip_through_libggml_and_gguf() -> None:
    """libggml's IQ1_M blocks, read back by the gguf package: a coarse but faithful copy of the matrix, worse
    than IQ2_XXS, closer on the columns the imatrix stresses (every other one: the weighting is within a
    block of 256), and deterministic."""
    w = _weight(32, 512, seed=4)
    importance = torch.ones(512)
    importance[::2] = 100.0
    rel = {}
    for name in ("IQ1_M", "IQ2_XXS"):
        blocks = quantize_ggml(w, name, importance)
        assert blocks.shape == (32, 512 * type_bits(name) / 8)
        assert np.array_equal(blocks, quantize_ggml(w, name, importance))
        rel[name] = float(((dequantize_ggml(blocks, name, 512) - w) ** 2).mean() / (w**2).mean())
    assert rel["IQ2_XXS"] < rel["IQ1_M"] < 0.4, rel
    flat = dequantize_ggml(quantize_ggml(w, "IQ1_M", torch.ones(512)), "IQ1_M", 512)
    weighted = dequantize_ggml(quantize_ggml(w, "IQ1_M", importance), "IQ1_M", 512)
    err = lambda d: float(((d - w)[:, ::2] ** 2).mean())  # noqa: E731
    assert err(weighted) < 0.9 * err(flat)


def test_cli_refuses_width_1_for_integer_code_methods(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Before any work: one line naming the method with a 1-bit width."""
    from mixprec.cli import main

    assert main(["quantize", "--method", "rtn", "--bits", "1", "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bits=1" in err and "--method gguf-iq has a 1-bit width" in err
    assert not (tmp_path / "w").exists()
    with pytest.raises(QuantConfigError, match="gguf-iq"):
        QuantConfig(method="gptq", bits=1)


@pytest.mark.parametrize("kwargs", [dict(bits=7), dict(bits=1), dict(bits=4, symmetric=False),
                                    dict(bits=4, group_size=128)])
def test_settings_ggml_cannot_honour_are_refused(kwargs: dict) -> None:
    with pytest.raises(QuantConfigError):
        QuantConfig(method="gguf", **kwargs)


def test_variant_round_trip_and_exact_manifest_bits(tiny_model_dirs: dict, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    model_map = checkpoint.model_map("layer")
    config = QuantConfig(method="gguf", bits=3)
    (variant,) = ensure_variants(checkpoint, model_map, [config], tmp_path)
    assert variant.path.name == "gguf-q3_k"
    quantizer = get_quantizer(config)
    ref = model_map.select()[0].weights[0]
    fresh = quantizer.quantize(checkpoint.read(ref.key).to(torch.float32))
    stored = variant.quantized(ref)
    assert torch.equal(stored.codes, fresh.codes) and torch.equal(stored.dequantize(), fresh.dequantize())
    units = variant.manifest.units
    # hidden 64: every K-quant row falls back to Q4_0 (4.5 bpw), as llama.cpp would write it
    assert all(u.storage_bits == u.numel * 4.5 for u in units.values())
