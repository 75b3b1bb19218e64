"""A search over several budgets whose recipes are consistent: more bits are never worse.

Independent studies per budget can cross: the study at 3.5 bpw may settle on a recipe that is worse
than the one found at 3.0, although that one fits 3.5 too (each study sees only its own trials, and
candidates differ by less than the calibration noise). `run_budgets` links them:

1. ascending: each budget's study is also seeded with the smaller budget's pick, as is (it fits)
   and moved up to this budget (`mixprec.search.moves.repair`: the freed bits filled where the
   estimate gains most);
2. descending: each smaller budget's study gets the larger budget's pick moved down (lowered where
   the estimate loses least) as extra trials, so a good structure found at one size reaches all;
3. ascending again, the held-out check ships at each budget the lowest-calibration-KL of the study's
   pick, every uniform quant that fits and the recipe shipped at the next smaller budget
   (`mixprec.search.pipeline.SMALLER_BUDGET`). Calibration KL is deterministic on the shared
   windows, so the shipped calibration KL never rises with the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from mixprec.core.errors import MixprecError
from mixprec.search.costs import Option
from mixprec.search.inputs import Inputs, StageConfig, prepare
from mixprec.search.moves import repair, total_cost
from mixprec.search.pipeline import SMALLER_BUDGET, EngineCache, StageResult, _Candidate, _finish, _Searched, _study
from mixprec.search.solve import Problem, Solution

__all__ = ["neighbour_seeds", "run_budgets"]

log = logging.getLogger(__name__)


def neighbour_seeds(problem: Problem, limit_bits: int, label: str,
                    assignment: Mapping[str, Option]) -> list[Solution]:
    """Another budget's recipe moved to this one: as is when it fits, and repaired to use this budget
    (lowered until it fits, then filled), each labelled `label` / `label-moved`."""
    try:
        picks = list(problem.indices(assignment))
    except (KeyError, ValueError):
        log.info("not seeding from %s: its recipe uses widths or groups this search does not allow", label)
        return []
    found = [problem.solution(assignment, label)] if total_cost(problem, picks) <= limit_bits else []
    moved = problem.solution(problem.assignment(repair(problem, picks, limit_bits)), f"{label}-moved")
    if not found or moved.assignment != found[0].assignment:
        found.append(moved)
    return found


def _polish(config: StageConfig, inputs: Inputs, engines: EngineCache, searched: _Searched,
            larger: _Searched) -> _Searched:
    """Resume a budget's study with the larger budget's pick moved down as extra trials."""
    extra = neighbour_seeds(inputs.problem, inputs.limit_bits, "larger-budget", larger.result.best.assignment)
    result = searched.result
    trials = len(result.history) + len(result.pruned) + result.waiting + len(extra)
    polished = _study(replace(config, search=replace(config.search, trials=trials)), inputs, engines, extra)
    cost = {k: v + polished.cost.get(k, 0.0) for k, v in searched.cost.items()}
    return replace(polished, cost={**cost, "study_trials": float(len(polished.result.history)),
                                   "study_pruned": float(len(polished.result.pruned))})


def run_budgets(configs: Sequence[StageConfig], inputs: Sequence[Inputs] | None = None,
                engines: EngineCache | None = None) -> list[StageResult]:
    """One stage per budget (same measurement, constraints and windows), linked as the module doc says;
    results in the order of `configs`."""
    if not configs:
        raise MixprecError("run_budgets needs at least one stage configuration")
    engines = engines or EngineCache.for_config(configs[0])
    prepared = list(inputs) if inputs is not None else [prepare(c) for c in configs]
    order = sorted(range(len(configs)), key=lambda k: prepared[k].limit_bits)
    searched: dict[int, _Searched] = {}
    for position, k in enumerate(order):
        extra: list[Solution] = []
        if position:
            smaller = searched[order[position - 1]].result.best.assignment
            extra = neighbour_seeds(prepared[k].problem, prepared[k].limit_bits, "smaller-budget", smaller)
        searched[k] = _study(configs[k], prepared[k], engines, extra)
    for small, large in reversed(list(zip(order, order[1:], strict=False))):
        searched[small] = _polish(configs[small], prepared[small], engines, searched[small], searched[large])
    results: dict[int, StageResult] = {}
    previous: _Candidate | None = None
    for k in order:
        results[k] = _finish(searched[k], engines, {SMALLER_BUDGET: previous} if previous else None)
        shipped = results[k].shipped
        previous = _Candidate(shipped.solution, shipped.variants or prepared[k].variants) if shipped else None
    return [results[k] for k in range(len(configs))]
