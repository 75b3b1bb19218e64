"""Bit packing: exact round trips at every width, the documented little-endian layout, and clear errors.

Run: .venv/bin/python -m pytest tests/test_pack.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from mixprec.checkpoint.pack import PACK_BITS, PackError, pack_codes, packed_row_bytes, packed_shape, unpack_codes

SHAPES = [(1, 1), (3, 7), (5, 13), (17, 129), (4, 64), (40,), (2, 3, 11)]


def _reference_pack_row(codes: list[int], bits: int) -> list[int]:
    """Bit-by-bit packing written from the layout described in mixprec.checkpoint.pack (independent of its code)."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for j, code in enumerate(codes):
        for i in range(bits):
            k = j * bits + i
            out[k // 8] |= ((code >> i) & 1) << (k % 8)
    return out


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact(bits: int, shape: tuple[int, ...]) -> None:
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == packed_shape(shape, bits)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


@pytest.mark.parametrize("bits", PACK_BITS)
def test_extreme_codes_round_trip(bits: int) -> None:
    for value in (0, 2**bits - 1):
        codes = torch.full((3, 21), value, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.shape), codes)


@pytest.mark.parametrize("bits", PACK_BITS)
def test_layout_matches_bitwise_reference(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 19), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    for row in range(3):
        assert packed[row].tolist() == _reference_pack_row(codes[row].tolist(), bits), f"row {row} at {bits} bits"


def test_documented_example_and_byte_straddling() -> None:
    assert pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [[57]]
    # 3-bit codes 7, 0, 5: bits 111 000 101 -> byte0 = 0b01000111, byte1 = 0b1 (the last code straddles)
    assert pack_codes(torch.tensor([7, 0, 5], dtype=torch.uint8), 3).tolist() == [[0b01000111, 0b1]]


@pytest.mark.parametrize("bits", PACK_BITS)
def test_packed_size_is_exact_up_to_row_padding(bits: int) -> None:
    rows, cols = 6, 37
    packed = pack_codes(torch.zeros(rows, cols, dtype=torch.uint8), bits)
    assert packed.numel() * 8 - rows * cols * bits == rows * (packed_row_bytes(cols, bits) * 8 - cols * bits)
    assert packed_row_bytes(cols, bits) * 8 - cols * bits < 8
    assert packed_row_bytes(64, bits) * 8 == 64 * bits  # no padding when cols * bits is a multiple of 8


def test_rows_are_independent_streams() -> None:
    codes = torch.randint(0, 8, (5, 11), dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert torch.equal(unpack_codes(packed[2:4], 3, (2, 11)), codes[2:4])


def test_code_too_large_is_rejected() -> None:
    with pytest.raises(PackError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)


def test_wrong_dtype_and_width_are_rejected() -> None:
    with pytest.raises(PackError, match="uint8"):
        pack_codes(torch.tensor([[1]], dtype=torch.int32), 4)
    with pytest.raises(PackError, match="bits=9"):
        pack_codes(torch.tensor([[1]], dtype=torch.uint8), 9)


def test_unpack_checks_the_packed_shape() -> None:
    packed = pack_codes(torch.zeros(4, 16, dtype=torch.uint8), 3)
    with pytest.raises(PackError, match="pack to uint8"):
        unpack_codes(packed, 4, (4, 16))
    with pytest.raises(PackError, match="pack to uint8"):
        unpack_codes(packed[:, :-1], 3, (4, 16))
