"""Bit packing of integer codes: b-bit values (1..8) as a dense little-endian bitstream, one stream per row.

Layout. Each row of `cols` codes becomes `ceil(cols * b / 8)` bytes. Code `j` of a row occupies
bits `[j*b, (j+1)*b)` of the row's stream, and bit `k` of the stream is bit `k % 8` of byte
`k // 8` (least significant bit first), so a code may straddle two bytes at 3, 5, 6 and 7 bits.
The unused high bits of a row's last byte are zero: that per-row padding (at most 7 bits per row)
is the only difference between the packed size and the exact `rows * cols * b` bits that
`QuantConfig.storage_bits` predicts, and it is zero whenever `cols * b` is a multiple of 8
(for example any input dimension divisible by 8).

Rows are packed separately (rather than one stream per tensor) so a row, an expert, or a slice of
rows can be unpacked without touching the rest, and so the packed tensor keeps the [out, ...] shape
that sharded loaders expect. Both directions are vectorised in uint8 arithmetic: 8 codes always fill
exactly b bytes, so rows are cut into blocks of 8 codes; code j of a block starts in byte j*b // 8 at
bit j*b % 8 and spills into the next byte when that offset + b > 8, so each of the 8 positions is a
couple of shift/or operations over all blocks at once (5-8x faster than assembling int64 words,
see benchmarks/bench_pack.py). 8-bit codes are stored as they are.
"""

from __future__ import annotations

import math

import torch

from mixprec.core.errors import MixprecError

__all__ = ["PackError", "PACK_BITS", "packed_row_bytes", "packed_shape", "pack_codes", "unpack_codes"]

#: Widths the packer supports (the quantizers use 2..8).
PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_ROW_CHUNK_CODES = 1 << 24  # codes handled per step: bounds the scratch copies at ~16 MiB each


class PackError(MixprecError):
    """Codes or packed bytes do not fit the requested width or shape."""


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise PackError(f"bits={bits} cannot be packed; choose one of {PACK_BITS}")


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes one row of `cols` codes takes when packed at `bits` (padded up to a whole byte)."""
    _check_bits(bits)
    return math.ceil(cols * bits / 8)


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    """Shape of `pack_codes(codes of shape, bits)`: [rows, packed_row_bytes(cols)]; 1-D counts as one row."""
    rows, cols = (1, shape[0]) if len(shape) == 1 else (math.prod(shape[:-1]), shape[-1])
    return rows, packed_row_bytes(cols, bits)


def _as_rows(codes: torch.Tensor) -> torch.Tensor:
    if codes.dim() == 0:
        raise PackError("cannot pack a 0-d tensor; pass codes of shape [cols] or [rows, cols]")
    return codes.reshape(1, -1) if codes.dim() == 1 else codes.reshape(-1, codes.shape[-1])


def _pack_rows(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [r, cols] uint8 codes into [r, 8-code blocks * bits] bytes (before trimming)."""
    r, cols = rows.shape
    blocks = math.ceil(cols / 8)
    codes = torch.nn.functional.pad(rows, (0, blocks * 8 - cols)).view(r, blocks, 8)
    out = torch.zeros(r, blocks, bits, dtype=torch.uint8)
    for j in range(8):  # code j of every block at once: low part into byte k, overflow into byte k + 1
        k, offset = divmod(j * bits, 8)
        out[:, :, k] |= codes[:, :, j] << offset  # uint8 shift drops the bits that overflow
        if offset + bits > 8:
            out[:, :, k + 1] |= codes[:, :, j] >> (8 - offset)
    return out.view(r, blocks * bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bits) of shape [cols] or [..., cols] into uint8 [rows, row bytes].

    Example: `pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 2)` is `tensor([[57]])`
    (0b00_11_10_01: the first code sits in the lowest bits).
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise PackError(f"codes must be uint8, got {codes.dtype}; quantizers emit uint8 codes")
    rows = _as_rows(codes).contiguous()
    if rows.numel() and int(rows.max()) >= 2**bits:
        raise PackError(f"a code is {int(rows.max())}, which does not fit in {bits} bits (max {2**bits - 1})")
    row_bytes = packed_row_bytes(rows.shape[1], bits)
    if bits == 8:
        return rows.clone()
    step = max(1, _ROW_CHUNK_CODES // max(rows.shape[1], 1))
    parts = [_pack_rows(rows[start : start + step], bits)[:, :row_bytes] for start in range(0, rows.shape[0], step)]
    return torch.cat(parts) if parts else torch.empty(0, row_bytes, dtype=torch.uint8)


def _unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    r = packed.shape[0]
    blocks = math.ceil(cols / 8)
    data = torch.nn.functional.pad(packed, (0, blocks * bits - packed.shape[1])).view(r, blocks, bits)
    codes = torch.empty(r, blocks, 8, dtype=torch.uint8)
    for j in range(8):
        k, offset = divmod(j * bits, 8)
        value = data[:, :, k] >> offset
        if offset + bits > 8:
            value = value | (data[:, :, k + 1] << (8 - offset))
        codes[:, :, j] = value & (2**bits - 1)
    return codes.view(r, blocks * 8)[:, :cols]


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Invert `pack_codes`: uint8 codes of `shape` from packed bytes [rows, row bytes]."""
    _check_bits(bits)
    shape = tuple(int(s) for s in shape)
    expected = packed_shape(shape, bits)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise PackError(f"packed tensor is {packed.dtype} {tuple(packed.shape)} but codes of shape {shape} at "
                        f"{bits} bits pack to uint8 {expected}; the bit width or shape recorded for it is wrong")
    packed = packed.contiguous()
    if bits == 8:
        return packed.clone().view(shape)
    cols = shape[-1]
    step = max(1, _ROW_CHUNK_CODES // max(cols, 1))
    parts = [_unpack_rows(packed[start : start + step], bits, cols) for start in range(0, packed.shape[0], step)]
    codes = torch.cat(parts) if parts else torch.empty(0, cols, dtype=torch.uint8)
    return codes.view(shape)
