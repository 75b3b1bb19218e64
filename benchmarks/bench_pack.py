"""Pack / unpack throughput of `mixprec.checkpoint.pack` per bit width, next to the dequantize step it feeds.

Throughput is in MB/s of uint8 codes (one byte per weight before packing). For each width the pack,
unpack and dequantize (codes -> fp32 with fp16 scales, group 64) steps are interleaved and repeated,
and the medians are printed with ratios measured in the same run: unpack time relative to the
dequantize time (how much packing adds to `mixprec.load`), relative to the 8-bit path (a plain copy),
and the speedup of mixprec's uint8 shift/or unpacking over the obvious alternative of assembling each
8-code block into one int64 word (kept here as the baseline). These machines are shared and noisy, so
only ratios from one run are meaningful.

Run: .venv/bin/python benchmarks/bench_pack.py [--rows 2048] [--cols 2048] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mixprec.checkpoint.pack import PACK_BITS, pack_codes, unpack_codes
from mixprec.quant import QuantizedWeight


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _unpack_int64_words(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Baseline: 8 codes = b bytes, assembled into an int64 word and split with shifts."""
    rows = packed.shape[0]
    blocks = -(-cols // 8)
    padded = torch.nn.functional.pad(packed, (0, blocks * bits - packed.shape[1])).to(torch.int64)
    words = (padded.view(rows, blocks, bits) << (torch.arange(bits) * 8)).sum(dim=-1, keepdim=True)
    codes = ((words >> (torch.arange(8) * bits)) & (2**bits - 1)).to(torch.uint8)
    return codes.view(rows, blocks * 8)[:, :cols]


def _measure(bits: int, rows: int, cols: int, repeats: int) -> dict[str, float]:
    codes = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    scales = torch.rand(rows, cols // 64, dtype=torch.float16)
    weight = QuantizedWeight(codes, scales, None, bits, 64)
    assert torch.equal(_unpack_int64_words(packed, bits, cols), codes)
    times: dict[str, list[float]] = {"pack": [], "unpack": [], "int64": [], "dequantize": []}
    for _ in range(repeats):
        times["pack"].append(_time(lambda: pack_codes(codes, bits)))
        times["unpack"].append(_time(lambda: unpack_codes(packed, bits, codes.shape)))
        times["int64"].append(_time(lambda: _unpack_int64_words(packed, bits, cols)))
        times["dequantize"].append(_time(weight.dequantize))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    megabytes = args.rows * args.cols / 1e6
    results = {bits: _measure(bits, args.rows, args.cols, args.repeats) for bits in PACK_BITS}
    base_unpack = results[8]["unpack"]
    print(f"{args.rows} x {args.cols} codes ({megabytes:.1f} MB), median of {args.repeats}, {args.threads} thread(s)")
    print(f"{'bits':>4}  {'pack MB/s':>10}  {'unpack MB/s':>11}  {'dequant MB/s':>12}  "
          f"{'unpack/dequant':>14}  {'unpack/8-bit copy':>17}  {'speedup vs int64':>16}")
    for bits, r in results.items():
        print(f"{bits:>4}  {megabytes / r['pack']:>10.1f}  {megabytes / r['unpack']:>11.1f}  "
              f"{megabytes / r['dequantize']:>12.1f}  {r['unpack'] / r['dequantize']:>14.2f}  "
              f"{r['unpack'] / base_unpack:>17.1f}  {r['int64'] / r['unpack']:>16.1f}")


if __name__ == "__main__":
    main()
