"""Quantize throughput (weights MB/s, fp32 source bytes) of the RTN quantizer, measured side by side.

Compares, in one interleaved run: clipping search vs plain scales, batched fused-expert quantization vs
a per-expert loop, and the whole `mixprec quantize` variant build on the bundled model. These
machines are noisy, so every configuration is repeated and medians and ratios are printed.

Run: .venv/bin/python benchmarks/bench_quantize.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mixprec.model.loading import Checkpoint
from mixprec.quant import QuantConfig, get_quantizer
from mixprec.quant.variants import quantize_variant


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matrix_cases(experts: torch.Tensor, repeats: int) -> None:
    megabytes = experts.numel() * 4 / 1e6
    print(f"fused experts {tuple(experts.shape)} = {megabytes:.1f} MB fp32")
    print(f"{'bits':>4} {'clip MB/s':>10} {'plain MB/s':>11} {'clip/plain time':>16} "
          f"{'batched MB/s':>13} {'loop MB/s':>10} {'loop/batched time':>18}")
    for bits in (2, 4, 8):
        clip = get_quantizer(QuantConfig(bits=bits))
        plain = get_quantizer(QuantConfig(bits=bits, clip_search=False))
        timings = {"clip": [], "plain": [], "batched": [], "loop": []}
        for _ in range(repeats):  # interleave the candidates so drift hits all of them
            timings["clip"].append(_median_seconds(lambda q=clip: q.quantize(experts[0]), 1) * experts.shape[0])
            timings["plain"].append(_median_seconds(lambda q=plain: q.quantize(experts[0]), 1) * experts.shape[0])
            timings["batched"].append(_median_seconds(lambda q=clip: q.quantize_experts(experts), 1))
            timings["loop"].append(_median_seconds(
                lambda q=clip: [q.quantize(experts[e]) for e in range(experts.shape[0])], 1))
        t = {k: statistics.median(v) for k, v in timings.items()}
        ratio = t['clip'] / t['plain']
        print(f"{bits:>4} {megabytes / t['clip']:>10.1f} {megabytes / t['plain']:>11.1f} {ratio:>16.2f} "
              f"{megabytes / t['batched']:>13.1f} {megabytes / t['loop']:>10.1f} {t['loop'] / t['batched']:>18.2f}")


def _variant_case(repeats: int) -> None:
    try:
        checkpoint = Checkpoint.open(None)
    except Exception as exc:  # the bundled model may not exist in a fresh checkout mid-training
        print(f"skipping whole-model case: {exc}")
        return
    model_map = checkpoint.model_map()
    megabytes = model_map.num_params() * 4 / 1e6
    print(f"\nwhole bundled model: {model_map.num_params():,} quantizable weights = {megabytes:.1f} MB fp32")
    print(f"{'variant':>16} {'seconds':>8} {'MB/s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (2, 4, 8):
            config = QuantConfig(bits=bits)
            seconds = _median_seconds(
                lambda c=config: quantize_variant(checkpoint, model_map, c, Path(tmp) / c.variant_id), repeats)
            print(f"{config.variant_id:>16} {seconds:>8.2f} {megabytes / seconds:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per configuration (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    _matrix_cases(torch.randn(8, 512, 256) * 0.02, args.repeats)
    _variant_case(max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
