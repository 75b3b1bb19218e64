"""Quantization time of GPTQ vs RTN on every quantizable matrix of a model, measured side by side.

All matrices are read into memory first and the Hessians are computed once (timed separately: it is a
one-off cost shared by every bit width), so the per-bit-width timings compare the quantizers alone.
RTN, GPTQ with act-order and GPTQ without it are interleaved and repeated; medians and ratios are
printed. These machines are shared and noisy, so only ratios from one run are meaningful.

Run: .venv/bin/python benchmarks/bench_gptq.py [MODEL] [--bits 2 3 4 8] [--repeats 3] [--threads 1]
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
from mixprec.quant import QuantConfig, Quantizer, get_quantizer
from mixprec.quant.calibration import Calibration, calibration_windows
from mixprec.quant.gptq import GPTQQuantizer, GPTQSettings
from mixprec.quant.hessians import CalibConfig

Job = tuple[torch.Tensor, torch.Tensor]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--calib-windows", type=int, default=CalibConfig.num_windows)
    return p


def _jobs(checkpoint: Checkpoint, calibration: Calibration) -> list[Job]:
    """(weight, Hessian) of every matrix of the default quantized kinds, as the variants stage sees them."""
    jobs = []
    for group in checkpoint.model_map("layer").select():
        for ref in group.weights:
            weight = ref.slice_disk(checkpoint.read(ref.key).to(torch.float32)).contiguous()
            jobs.append((weight, calibration.hessian(group, ref).clone()))
    return jobs


def _seconds(quantizer: Quantizer, jobs: list[Job], use_hessian: bool) -> float:
    start = time.perf_counter()
    for weight, hessian in jobs:
        quantizer.quantize(weight, hessian if use_hessian else None)
    return time.perf_counter() - start


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    checkpoint = Checkpoint.open(args.model)
    config = CalibConfig(num_windows=args.calib_windows)
    windows = calibration_windows(checkpoint.path, config)
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Calibration(checkpoint, windows, config, Path(tmp))
        calib_s = _timed(calibration.prepare)
        jobs = _jobs(checkpoint, calibration)
    megabytes = sum(w.numel() for w, _ in jobs) * 4 / 1e6
    print(f"{len(jobs)} matrices, {megabytes:.1f} MB fp32; threads {args.threads}; calibration "
          f"(Hessians, {windows.spec.num_tokens} tokens, once for all bit widths) {calib_s:.2f} s")
    print(f"{'bits':>4} {'RTN s':>8} {'GPTQ s':>8} {'GPTQ-noAO s':>12} {'GPTQ/RTN':>9} {'noAO/RTN':>9} "
          f"{'RTN MB/s':>9} {'GPTQ MB/s':>10}")
    for bits in args.bits:
        quantizers = {
            "rtn": (get_quantizer(QuantConfig(method="rtn", bits=bits)), False),
            "gptq": (GPTQQuantizer(QuantConfig(method="gptq", bits=bits), GPTQSettings(act_order=True)), True),
            "noao": (GPTQQuantizer(QuantConfig(method="gptq", bits=bits), GPTQSettings(act_order=False)), True),
        }
        times: dict[str, list[float]] = {name: [] for name in quantizers}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every candidate
            for name, (quantizer, use_hessian) in quantizers.items():
                times[name].append(_seconds(quantizer, jobs, use_hessian))
        t = {name: statistics.median(v) for name, v in times.items()}
        print(f"{bits:>4} {t['rtn']:>8.2f} {t['gptq']:>8.2f} {t['noao']:>12.2f} {t['gptq'] / t['rtn']:>9.1f} "
              f"{t['noao'] / t['rtn']:>9.1f} {megabytes / t['rtn']:>9.1f} {megabytes / t['gptq']:>10.1f}")


if __name__ == "__main__":
    main(_parser().parse_args())
