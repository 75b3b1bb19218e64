"""Held-out KL of mixprec's searched recipes vs exllamav3 greedy, the --hq rule and uniform, at several budgets.

For one granularity and quantizer family it runs the search stage as `mixprec search --budget B1 B2 ...`
does (a linked sweep: each budget seeded with its neighbours' recipes, the shipped recipe never worse
than the smaller budget's; `--independent` runs one unlinked stage per budget as before), then prints
per budget: held-out KL ± SE with achieved bpw, the **equivalent uniform bpw gain** (the bpw at which
the same family's uniform curve, measured on the same held-out tokens, reaches that KL, minus the
recipe's bpw; `>` marks an extrapolated value), the ratio baseline KL / mixprec KL with its paired
bootstrap SE, the paired margin of the study's own decision, and the calibration cost in token-layers
(tokens x decoder layers run) beside the measurement's. Uniform is the nearest uniform quant at or
above the budget over every group size (more bits than the others, usually).

With `--options rtn-g32 rtn-g64 rtn-g128 [gptq-g64 ...]` every group picks width, group size and method
jointly (one table per family on the same tokens; GPTQ families are quantized first with their calibration);
the uniform curve, and the gain read from it, is then the lower envelope of every family's uniform quants,
i.e. the best uniform option at each size, and the measurement cost is the sum over the families' tables.

Run: .venv/bin/python benchmarks/search_budgets.py [MODEL] --budgets 2.5 3.0 3.5 4.0 --granularity fine
     (--method gptq for the GPTQ family; --options FAMILY... for options beyond bits; --data/--eval-data FILES
     for another text; --no-correct to ablate; --screen 0.25 to screen proposals on a quarter of the windows)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from mixprec.cli import main as mixprec_main
from mixprec.cli.common import default_work_dir
from mixprec.core.fileio import atomic_write_json
from mixprec.formats.recipe import Budget
from mixprec.measure.config import MeasureConfig
from mixprec.quant import QuantSettings, quantizer_class
from mixprec.quant.options import option_family, parse_families
from mixprec.search.inputs import Inputs, StageConfig, measure_missing, prepare
from mixprec.search.pipeline import EngineCache, StageResult, baseline_recipes, run_stage, run_stages
from mixprec.search.study import SearchConfig, quiet_optuna
from mixprec.search.sweep import run_budgets

BASELINES = ("greedy", "hq", "uniform")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--granularity", default="fine", choices=["layer", "fine", "expert", "expert-fine"])
    p.add_argument("--mode", default="drop", choices=["drop", "split"],
                   help="table searched: measured (drop) or, at --granularity expert, split from the fine table")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="rtn", help="quantizer family (rtn, gptq)")
    p.add_argument("--group-size", type=int, nargs="+", default=[64],
                   help="group size(s) of the searched variants (default 64); several run `run_stages` per budget")
    p.add_argument("--options", nargs="+", default=None, metavar="FAMILY",
                   help="option families searched jointly per group, e.g. rtn-g32 rtn-g64 rtn-g128 gptq-g64")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], help="measured widths")
    p.add_argument("--independent", action="store_true", help="one unlinked stage per budget (the old behaviour)")
    p.add_argument("--no-correct", action="store_true", help="no interaction correction of the estimate")
    p.add_argument("--select", default="same", choices=["same", "between"],  # same: as the rows measured before it
                   help="windows recipes are compared on: the measurement's, or the ones halfway between them")
    p.add_argument("--screen", type=float, default=0.0, metavar="F",
                   help="screen proposals on this fraction of the calibration windows (SearchConfig.screen; 0: off)")
    p.add_argument("--windows", type=int, default=32, help="calibration windows of the measurement (default 32)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data", type=Path, nargs="+", default=None, help="calibration text files (default: shipped)")
    p.add_argument("--eval-data", type=Path, nargs="+", default=None, help="held-out text files")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows (default 32)")
    p.add_argument("--studies-dir", type=Path, default=Path("studies"))
    p.add_argument("--recipes", type=Path, default=None, help="folder to save the shipped recipes in")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/search_budgets.json"))
    return p


def _config(args: argparse.Namespace, budget: float, size: int) -> StageConfig:
    work = default_work_dir(args.model, args.work)
    name = (args.model and Path(args.model).name) or "stdlib-moe"
    default = (size, args.method) == (QuantSettings.group_size, QuantSettings.method)
    suffix = "" if default else f"-{args.method}-g{size}"
    families = _families(args, size)
    if families:
        suffix = "-o" + "-".join(f"{f.method}{f.group_size}" for f in families)
    mode = "ind" if args.independent else "sweep"
    split = ("-split" if args.mode == "split" else "") + ("-between" if args.select == "between" else "")
    measure = MeasureConfig(work=work, model=args.model, mode=args.mode, granularity=args.granularity,
                            bits=tuple(args.bits),
                            quant=families[0] if families else QuantSettings(method=args.method, group_size=size),
                            num_windows=args.windows, seq_len=args.seq_len, data_files=tuple(args.data or ()))
    screen = f"-screen{args.screen:g}" if 0 < args.screen < 1 else ""
    search = SearchConfig(trials=args.trials, seed=args.seed, studies_dir=args.studies_dir,
                          correct=not args.no_correct, screen=args.screen,
                          study_name=f"{name}-{args.granularity}{split}{suffix}-{budget:g}bpw-{mode}"
                                     f"{'-nocorr' if args.no_correct else ''}{screen}-s{args.seed}")
    return StageConfig(work=work, budget=Budget(bpw=budget), model=args.model, granularity=args.granularity,
                       measure=measure, eval_windows=args.eval_windows, eval_seq_len=args.seq_len,
                       eval_files=tuple(args.eval_data or ()), search=search, gain_curve=True, options=families,
                       select=args.select)


def _families(args: argparse.Namespace, size: int) -> tuple[QuantSettings, ...]:
    return parse_families(args.options, QuantSettings(method=args.method, group_size=size)) if args.options else ()


def _quantize_calibrated(args: argparse.Namespace) -> None:
    """Variants of the option families that need a Hessian (GPTQ), made as `mixprec quantize --options` makes
    them (calibration on the train split); the measurement quantizes the others itself."""
    calibrated = [f"{f.method}-g{f.group_size}" for f in _families(args, args.group_size[0])
                  if quantizer_class(f.method).needs_hessian]
    if calibrated:
        work = default_work_dir(args.model, args.work)
        model = [args.model] if args.model else []
        code = mixprec_main(["-q", "quantize", *model, "--work", str(work), "--bits", *map(str, args.bits),
                             "--options", *calibrated])
        if code != 0:
            raise SystemExit(f"quantizing {calibrated} failed (exit {code})")


def _measurement_token_layers(inputs: Inputs) -> float:
    """Token-layers the sensitivity table cost: each row reruns the layers from its group's layer onwards. A split
    table (`--mode split`) cost its fine table's rows plus one forward pass over the tokens (the importance)."""
    summary = inputs.measurement.summary
    layers = inputs.checkpoint.num_layers
    split = summary.settings.mode == "split"
    groups = inputs.checkpoint.model_map("fine").select() if split else inputs.table.groups
    per_group = sum(layers - (g.layer or 0) for g in groups)
    tables = max(len(inputs.families), 1)  # with --options, one table per family on the same tokens
    rows = per_group * len(summary.settings.measured_bits) + (layers if split else 0)
    return float(rows * summary.data.num_tokens * tables)


def _run(args: argparse.Namespace, engines: EngineCache) -> tuple[list[StageResult], list[float], float]:
    sizes = list(dict.fromkeys(args.group_size))
    _quantize_calibrated(args)
    for size in sizes:
        measure_missing(_config(args, args.budgets[0], size))
    started = time.perf_counter()
    if len(sizes) > 1:
        results = [run_stages([_config(args, b, s) for s in sizes], engines=engines) for b in args.budgets]
        return results, [time.perf_counter() - started] * len(results), 0.0
    configs = [_config(args, b, sizes[0]) for b in args.budgets]
    inputs = [prepare(c) for c in configs]
    if args.independent:
        results, seconds = [], []
        for config, prepared in zip(configs, inputs, strict=True):
            t = time.perf_counter()
            results.append(run_stage(config, prepared, engines))
            seconds.append(time.perf_counter() - t)
    else:
        results = run_budgets(configs, inputs, engines)
        seconds = [(time.perf_counter() - started) / len(results)] * len(results)
    return results, seconds, _measurement_token_layers(inputs[0])


def _summary(budget: float, result: StageResult, seconds: float) -> dict[str, Any]:
    best = result.search.best.extra
    return {"budget": budget, "group_size": result.recipe.quantizer.group_size, "seconds": round(seconds, 1),
            "options": _option_shares(result), "recipe_groups": dict(result.recipe.groups),
            "shipped": result.cost.get("shipped"), "cost": {k: v for k, v in result.cost.items() if k != "shipped"},
            "decision": {k: best[k] for k in ("decision_margin", "decision_se") if k in best},
            "correction": result.search.correction, "pruned": result.search.pruned, "rows": result.comparison,
            "curve": result.curve.to_dict() if result.curve else None}


def _option_shares(result: StageResult) -> dict[str, float]:
    """Share of the groups per option family (`<method>-g<size>`) in the shipped recipe."""
    recipe, shares = result.recipe, {}
    for option in recipe.groups.values():
        if option is not None:
            family = option_family(option, recipe.quantizer)
            key = f"{family.method}-g{family.group_size}"
            shares[key] = shares.get(key, 0) + 1
    total = sum(shares.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(shares.items())}


def _gain(row: dict[str, Any]) -> str:
    if "gain" not in row:
        return ""
    mark = ">" if row["extrapolated"] and row["gain"] > 0 else ""
    return f"gain {mark}{row['gain']:+.2f}±{row['gain_se']:.2f}"


def _print(results: list[dict[str, Any]], measurement_cost: float) -> None:
    for r in results:
        rows = {row["recipe"]: row for row in r["rows"]}
        m = rows["mixprec"]
        shipped = f" (shipped: {r['shipped']})" if r["shipped"] != "mixprec" else ""
        print(f"budget {r['budget']:.2f}: mixprec {m['evaluation_kl']:.3e}±{m['evaluation_se']:.0e} "
              f"({m['bpw']:.3f} bpw, g{r['group_size']}) {_gain(m)}{shipped}")
        if len(r["options"]) > 1:
            print("  options used (share of groups): " + ", ".join(f"{k} {v:.0%}" for k, v in r["options"].items()))
        fits = sorted(n for n in rows if n.startswith("uniform-fit"))
        greedies = sorted(n for n in rows if n.startswith("greedy-"))  # greedy on each other option family
        for b in (*BASELINES, *greedies, *fits, "smaller-budget"):
            if b in rows:
                x = rows[b]
                print(f"  {b:15} {x['evaluation_kl']:.3e} ({x['bpw']:.3f}) ratio {x['ratio_vs_mixprec']:.3f}"
                      f"±{x['ratio_se']:.3f}  diff {x['diff_vs_mixprec']:+.1e}±{x['diff_se']:.0e}  {_gain(x)}")
        d, c = r["decision"], r["cost"]
        if d:
            pruned = f" + {c['study_pruned']:.0f} pruned" if c.get("study_pruned") else ""
            print(f"  decision margin {d['decision_margin']:.1e}±{d['decision_se']:.0e}; study "
                  f"{c.get('study_token_layers', 0):.3g} token-layers in {c.get('study_trials', 0):.0f} trials"
                  f"{pruned} (measurement {measurement_cost:.3g}, shared by all budgets)")


def _save_recipes(args: argparse.Namespace, results: list[StageResult]) -> None:
    """The shipped recipes as <model>-<budget>bpw.yaml and, for one group size, the baselines beside them as
    <model>-<budget>bpw.<baseline>.yaml (for `paired_recipes.py` against another table or granularity)."""
    name = Path(args.model or "stdlib-moe").name
    for budget, result in zip(args.budgets, results, strict=True):
        result.recipe.save(args.recipes / f"{name}-{budget}bpw.yaml")
        if len(args.group_size) == 1:
            config = _config(args, budget, args.group_size[0])
            for baseline, recipe in baseline_recipes(prepare(config), config).items():
                recipe.save(args.recipes / f"{name}-{budget}bpw.{baseline}.yaml")


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_optuna()
    engines = EngineCache()  # one reference capture per split, shared by every budget
    results, seconds, measurement_cost = _run(args, engines)
    summaries = [_summary(b, r, s) for b, r, s in zip(args.budgets, results, seconds, strict=True)]
    if args.recipes is not None:
        _save_recipes(args, results)
    settings = {k: [str(x) for x in v] if isinstance(v, list) and v and isinstance(v[0], Path)
                else str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    atomic_write_json(args.json, {"args": settings,
                                  "measurement_token_layers": measurement_cost, "budgets": summaries})
    _print(summaries, measurement_cost)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
