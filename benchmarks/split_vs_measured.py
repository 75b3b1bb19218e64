"""Split mode vs a measured per-expert table: how well the split rows rank the experts, and what each costs.

Measures (or reuses, from the work folder) the fine drop table, the per-expert drop table (every routed
expert swapped alone) and the split table (the fine table's expert losses shared out by router-weighted
output error, `mixprec.measure.split`), then prints per width the Spearman rank correlation and the Pearson
correlation of log-KL between split and measured expert rows and the split/measured sum ratio, over the experts
the calibration windows route tokens to, and the seconds each table took in this run (0 = reused).
`--no-routing-weight` is not offered: the unweighted variant was measured once in development (Spearman
0.87-0.89 at 2-4 bits on the bundled model) and is not a mode.

Run: .venv/bin/python benchmarks/split_vs_measured.py [MODEL] --work WORK [--windows 32 --seq-len 256]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mixprec.cli.common import default_work_dir
from mixprec.core.fileio import atomic_write_json
from mixprec.measure.config import MeasureConfig
from mixprec.measure.run import run_measure
from mixprec.measure.table import is_finished, load_measurement


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/split_vs_measured.json"))
    return p


def _table(config: MeasureConfig) -> tuple[dict[tuple[str, int], float], float]:
    """Expert rows (group, bits) -> KL, and the seconds the table took as its summary records them (the jobs'
    and the reference's for a measured table; the split's own for a split one, its fine table not counted)."""
    folder = config.folder if is_finished(config.folder) else run_measure(config)
    measurement = load_measurement(folder)
    timing = measurement.summary.timing
    seconds = timing.get("split_s") or (timing.get("jobs_s_total") or 0.0) + (timing.get("reference_s") or 0.0)
    experts = measurement.table[measurement.table["kind"] == "routed_experts"]
    return {(str(r.group), int(r.bits)): float(r.kl_mean) for r in experts.itertuples()}, float(seconds)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _compare(split: dict[tuple[str, int], float], measured: dict[tuple[str, int], float], bits: int) -> dict[str, Any]:
    """Correlations over the experts the calibration windows route tokens to: one never routed there gets a split
    row of exactly 0 and a measured row of float noise (~1e-9), so it has no rank to get right, and no log."""
    keys = sorted(k for k in measured if k[1] == bits)
    x = torch.tensor([split[k] for k in keys], dtype=torch.float64)
    y = torch.tensor([measured[k] for k in keys], dtype=torch.float64)
    routed = (x > 0) & (y > 0)
    x, y = x[routed], y[routed]
    return {"bits": bits, "experts": len(keys), "routed": int(routed.sum()),
            "spearman": _correlation(_ranks(x), _ranks(y)),
            "pearson_log": _correlation(x.log(), y.log()), "sum_ratio": float(x.sum() / y.sum())}


def main() -> None:
    args = _parser().parse_args()
    work = default_work_dir(args.model, args.work)
    base = MeasureConfig(work=work, model=args.model, bits=tuple(args.bits), num_windows=args.windows,
                         seq_len=args.seq_len, granularity="expert")
    measured, measured_s = _table(base)
    split, split_s = _table(replace(base, mode="split"))
    rows = [_compare(split, measured, b) for b in args.bits]
    print(f"experts' rows: per-expert table measured in {measured_s:.0f} s, split from the fine table {split_s:.0f} s "
          "(each table's recorded time; the fine table, needed by both searches anyway, not counted)")
    print("bits  experts  routed  spearman  pearson(log KL)  split/measured sum  (over the routed experts)")
    for r in rows:
        print(f"{r['bits']:>4}  {r['experts']:>7}  {r['routed']:>6}  {r['spearman']:8.3f}  {r['pearson_log']:15.3f}  "
              f"{r['sum_ratio']:18.3f}")
    atomic_write_json(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                  "measured_s": measured_s, "split_s": split_s, "rows": rows})


if __name__ == "__main__":
    main()
