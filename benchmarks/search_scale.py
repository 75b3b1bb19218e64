"""How the search's solvers scale to a width per routed expert on the largest MoEs, and what the convex-hull
front costs in recipe quality where the exact DP still runs.

The problems are shaped like DeepSeek-V3 (61 layers, the first 3 dense; MLA attention as q | kv | o; one
shared expert; 256 routed experts of 7168 x 2048 with gate+up and down apart, i.e. `--granularity
expert-fine`): exact parameter counts and exact storage bits (b + 16/G per weight, `mixprec.quant.base`)
for RTN at group sizes 32/64/128 and widths 2-8 (18 options per group, `--options rtn-g64 rtn-g32
rtn-g128`). The losses are synthetic, since no measured table of such a model exists here: each group's
sensitivity is log-normal (experts differ by ~1000x, as measured on the bundled model) times 4^-bits
times a group-size factor. What is timed is solver work, which does not depend on where losses came from.

Printed, side by side in one run: wall time and peak RSS of the exact DP, the hull front, greedy (heap)
and the seeds the search starts from, at each problem size; loss of the hull recipe / exact DP recipe
and greedy / exact DP at budgets 2.5-4.0 where the exact DP runs; and, with `--study N`, the wall time of
N study trials (Optuna, SQLite in a temporary folder) with an additive evaluator, which times Optuna's own
overhead per group.

    python benchmarks/search_scale.py --experts 16 64 256 --moe-layers 58 --json benchmarks/results/search_scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixprec.model.arch import GroupKind
from mixprec.search.moves import total_cost
from mixprec.search.solve import (
    Problem,
    compressed_solutions,
    exact_front,
    greedy,
    hq_at_budget,
    hull_front,
    pareto_front,
    tied_solutions,
)
from mixprec.search.study import SearchConfig, quiet_optuna, run_search

HIDDEN, EXPERT, SHARED, DENSE = 7168, 2048, 2048, 18432
ATTENTION = {"q": 7168 * 1536 + 1536 * 24576, "kv": 7168 * 576 + 512 * 32768, "o": 16384 * 7168}
WIDTHS, GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)


def _groups(moe_layers: int, experts: int, dense_layers: int) -> list[tuple[str, GroupKind, int, int]]:
    """(name, kind, layer, parameters) of every group at expert-fine granularity."""
    rows = []
    for layer in range(dense_layers + moe_layers):
        rows += [(f"layers.{layer}.attn.{p}", GroupKind.ATTENTION, layer, n) for p, n in ATTENTION.items()]
        if layer < dense_layers:
            rows += [(f"layers.{layer}.mlp.gate_up", GroupKind.DENSE_MLP, layer, 2 * HIDDEN * DENSE),
                     (f"layers.{layer}.mlp.down", GroupKind.DENSE_MLP, layer, HIDDEN * DENSE)]
            continue
        rows += [(f"layers.{layer}.shared.gate_up", GroupKind.SHARED_EXPERTS, layer, 2 * HIDDEN * SHARED),
                 (f"layers.{layer}.shared.down", GroupKind.SHARED_EXPERTS, layer, HIDDEN * SHARED)]
        for e in range(experts):
            rows += [(f"layers.{layer}.experts.{e}.gate_up", GroupKind.ROUTED_EXPERTS, layer, 2 * HIDDEN * EXPERT),
                     (f"layers.{layer}.experts.{e}.down", GroupKind.ROUTED_EXPERTS, layer, HIDDEN * EXPERT)]
    return rows


def make_problem(moe_layers: int, experts: int, dense_layers: int = 3, seed: int = 0) -> Problem:
    """Exact costs of 18 RTN options per group and synthetic, heterogeneous losses."""
    rng = np.random.default_rng(seed)
    rows = _groups(moe_layers, experts, dense_layers)
    options = tuple(sorted(((b, g) for b in WIDTHS for g in GROUP_SIZES), key=lambda o: (o[0], -o[1])))
    labels = tuple(f"rtn-b{b}-g{g}" for b, g in options)
    names, costs, losses = [], [], []
    for name, kind, _, params in rows:
        spread = 2.0 if kind is GroupKind.ROUTED_EXPERTS else 0.7
        sensitivity = float(rng.lognormal(-4.0, spread)) * params / 1e8
        names.append(name)
        costs.append(tuple(params * b + params // g * 16 for b, g in options))
        losses.append(tuple(sensitivity * 4.0 ** -b * (1 + 0.15 * math.log2(g / 32)) for b, g in options))
    return Problem(tuple(names), tuple(labels for _ in rows), tuple(costs), tuple(losses),
                   tuple(r[1] for r in rows), tuple(r[2] for r in rows), tuple(r[3] for r in rows))


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def solver_rows(problem: Problem, budgets: list[float], exact: bool) -> dict[str, Any]:
    """Wall time of each solver over all budgets; loss ratios to the exact DP where it runs."""
    params = problem.total_params
    limits = [int(b * params) for b in budgets]
    hull, t_hull = timed(lambda: hull_front(problem))
    row: dict[str, Any] = {"groups": len(problem.names), "options": len(problem.options[0]),
                           "hull_front_s": t_hull, "hull_points": len(hull)}
    picked, t_fill = timed(lambda: [hull.best_under(limit) for limit in limits])
    row["hull_best_under_s"] = t_fill / len(limits)
    found, t_greedy = timed(lambda: [greedy(problem, limit) for limit in limits])
    row["greedy_s"] = t_greedy / len(limits)
    chosen = pareto_front(problem)
    row["pareto_front_gives"] = type(chosen).__name__
    _, t_seeds = timed(lambda: [(compressed_solutions(problem, limit), tied_solutions(problem, limit),
                                 hq_at_budget(problem, limit)) for limit in limits])
    row["other_seeds_s"] = t_seeds / len(limits)
    if exact:
        front, t_exact = timed(lambda: exact_front(problem))
        row.update(exact_front_s=t_exact, exact_points=len(front))
        best = [front.best_under(limit) for limit in limits]
        row["hull_over_exact"] = [h.loss / e.loss for h, e in zip(picked, best, strict=True)]
        row["greedy_over_exact"] = [g.loss / e.loss for g, e in zip(found, best, strict=True)]
    row["bpw"] = [s.cost / params for s in picked]
    row["peak_rss_gib"] = _peak_gib()
    return row


def study_row(problem: Problem, budget: float, trials: int) -> dict[str, Any]:
    """`trials` study trials with an additive evaluator (16 sequences x 16 tokens of per-token KL): the time
    Optuna and the sampler take per trial at this many groups, apart from any model."""
    limit = int(budget * problem.total_params)
    index = {name: i for i, name in enumerate(problem.names)}

    def evaluate(assignment: dict[str, Any], chunks: range | None = None) -> torch.Tensor:
        loss = sum(problem.losses[index[n]][problem.options[index[n]].index(o)] for n, o in assignment.items())
        return torch.full((256,), float(loss), dtype=torch.float64)

    seeds = [hull_front(problem).best_under(limit), greedy(problem, limit)]
    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(trials=trials, studies_dir=Path(tmp), artifacts=False)
        result, wall = timed(lambda: run_search(problem, limit, evaluate, 16, seeds, config))
    assert total_cost(problem, problem.indices(result.best.assignment)) <= limit
    return {"groups": len(problem.names), "trials": trials, "study_s": wall, "per_trial_s": wall / trials,
            "peak_rss_gib": _peak_gib()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256], help="routed experts per layer")
    parser.add_argument("--moe-layers", type=int, default=58, help="MoE layers (DeepSeek-V3: 58)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    parser.add_argument("--exact-up-to", type=int, default=2500, help="run the exact DP up to this many groups")
    parser.add_argument("--study", type=int, default=0, help="also time this many study trials per size")
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_optuna()
    rows = []
    for experts in args.experts:
        problem = make_problem(args.moe_layers, experts)
        row = {"experts": experts, **solver_rows(problem, args.budgets, len(problem.names) <= args.exact_up_to)}
        if args.study:
            row["study"] = study_row(problem, args.budgets[1], args.study)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1) + "\n", encoding="utf-8")
    sys.exit(0)


if __name__ == "__main__":
    main()
