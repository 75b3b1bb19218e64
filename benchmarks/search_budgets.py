"""Held-out KL of mixprec's searched recipe vs exllamav3 greedy, the --hq rule and uniform, at several budgets.

For every granularity and budget it runs the search stage exactly as `mixprec search` does (same
measurement, study, held-out evaluation), then prints one table: held-out KL ± SE per recipe with
its achieved bpw, the ratio baseline KL / mixprec KL, and the paired difference with its SE (same
evaluation tokens). Uniform is the smallest uniform variant at or above the budget, so it gets
*more* bits than the others. Results also go to a JSON file; recipes of one granularity to recipes/.

Run: .venv/bin/python benchmarks/search_budgets.py [MODEL] --budgets 2.5 3.0 3.5 4.0 --granularity layer fine
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mixprec.cli.common import default_work_dir
from mixprec.core.fileio import atomic_write_json
from mixprec.formats.recipe import Budget
from mixprec.measure.config import MeasureConfig
from mixprec.search.inputs import StageConfig, measure_missing
from mixprec.search.pipeline import EngineCache, run_stage, run_stages
from mixprec.search.study import SearchConfig, quiet_optuna

BASELINES = ("greedy", "hq", "uniform")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--granularity", nargs="+", default=["layer", "fine"], choices=["layer", "fine", "expert"])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, nargs="+", default=[64],
                   help="group size(s) of the searched variants (default 64); several run `run_stages`, which "
                        "ships the one with the lowest calibration KL")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows of 256 tokens (default 32)")
    p.add_argument("--studies-dir", type=Path, default=Path("studies"))
    p.add_argument("--recipes", type=Path, default=Path("recipes"), help="where recipes of --save-granularity go")
    p.add_argument("--save-granularity", default="fine")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/search_budgets.json"))
    return p


def _one(args: argparse.Namespace, granularity: str, budget: float, engines: EngineCache) -> dict[str, object]:
    work = default_work_dir(args.model, args.work)
    name = (args.model and Path(args.model).name) or "stdlib-moe"
    sizes = list(dict.fromkeys(args.group_size))

    def config(size: int) -> StageConfig:
        suffix = "" if size == 64 else f"-g{size}"
        measure = MeasureConfig(work=work, model=args.model, granularity=granularity, group_size=size)
        search = SearchConfig(trials=args.trials, seed=args.seed, studies_dir=args.studies_dir,
                              study_name=f"{name}-{granularity}{suffix}-{budget:g}bpw-s{args.seed}")
        return StageConfig(work=work, budget=Budget(bpw=budget), model=args.model, granularity=granularity,
                           measure=measure, eval_windows=args.eval_windows, search=search)

    started = time.perf_counter()
    configs = [config(size) for size in sizes]
    for stage in configs:
        measure_missing(stage)
    result = run_stage(configs[0], engines=engines) if len(configs) == 1 else run_stages(configs, engines=engines)
    seconds = time.perf_counter() - started
    if granularity == args.save_granularity:
        label = "" if sizes == [64] else "-g" + "+".join(map(str, sizes))
        result.recipe.save(args.recipes / f"{name}{label}-{budget}bpw.yaml")
    return {"granularity": granularity, "budget": budget, "group_size": result.recipe.quantizer.group_size,
            "seconds": round(seconds, 1), "rows": result.comparison}


def _print(results: list[dict[str, object]]) -> None:
    head = f"{'gran':6} {'budget':>6}  {'mixprec KL (bpw)':>26}" + "".join(f"  {b + ' KL (bpw), ratio, diff':>48}"
                                                                       for b in BASELINES)
    print(head)
    for r in results:
        rows = {row["recipe"]: row for row in r["rows"]}  # type: ignore[attr-defined]
        m = rows["mixprec"]
        line = f"{r['granularity']:6} {r['budget']:6.2f}  {m['evaluation_kl']:.3e}±{m['evaluation_se']:.0e} " \
               f"({m['bpw']:.3f}, g{r['group_size']})"
        for b in BASELINES:
            x = rows[b]
            line += (f"  {x['evaluation_kl']:.3e}±{x['evaluation_se']:.0e} ({x['bpw']:.3f}) "
                     f"{x['ratio_vs_mixprec']:5.2f}x {x['diff_vs_mixprec']:+.1e}±{x['diff_se']:.0e}")
        print(line)


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_optuna()
    engines = EngineCache()  # one reference capture per granularity and split, shared by every budget
    results = [_one(args, g, b, engines) for g in args.granularity for b in args.budgets]
    atomic_write_json(args.json, results)
    _print(results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
