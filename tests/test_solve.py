"""Solvers and budgets: exact DP against brute force, budgets never exceeded, rule baselines, exact costs.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_solve.py -q
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from mixprec.formats.recipe import Budget
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint
from mixprec.quant import QuantConfig
from mixprec.quant.variants import ensure_variants
from mixprec.search.costs import (
    NULL_BITS_PER_WEIGHT,
    BudgetError,
    Constraints,
    CostTable,
    InfeasibleBudgetError,
    budget_limit_bits,
    check_feasible,
    parse_settings,
)
from mixprec.search.solve import (
    HullFront,
    ParetoFront,
    Problem,
    compressed,
    compressed_solutions,
    exact_front,
    greedy,
    hq_at_budget,
    hq_rule,
    hull_front,
    isotonic_decreasing,
    pareto_front,
    tied_solutions,
    uniform,
)


def random_problem(rng: random.Random, groups: int, max_options: int, costly: bool = False) -> Problem:
    names, options, costs, losses = [], [], [], []
    for g in range(groups):
        k = rng.randint(1, max_options)
        widths = sorted(rng.sample([2, 3, 4, 5, 6, 8], k))
        size = rng.choice([64, 128, 96, 256]) if costly else rng.randint(1, 9)
        names.append(f"g{g}")
        options.append(tuple(widths))
        costs.append(tuple(size * w + rng.randint(0, 3) for w in widths))
        losses.append(tuple(rng.uniform(-0.5, 1.0) for _ in widths))  # not monotone on purpose
    kinds = tuple(rng.choice(list(GroupKind)[:4]) for _ in range(groups))
    layers = tuple(rng.randint(0, 3) for _ in range(groups))
    params = tuple(c[0] // o[0] for c, o in zip(costs, options, strict=True))
    return Problem(tuple(names), tuple(options), tuple(costs), tuple(losses), kinds, layers, params)


def brute_force(problem: Problem, limit: int) -> float | None:
    best = None
    for picks in itertools.product(*(range(len(o)) for o in problem.options)):
        cost = sum(problem.costs[i][k] for i, k in enumerate(picks))
        if cost <= limit:
            loss = sum(problem.losses[i][k] for i, k in enumerate(picks))
            best = loss if best is None else min(best, loss)
    return best


def test_dp_equals_brute_force_on_random_instances() -> None:
    rng = random.Random(1234)
    for _ in range(150):
        problem = random_problem(rng, rng.randint(1, 5), 4)
        front = pareto_front(problem)
        lo = sum(min(c) for c in problem.costs)
        hi = sum(max(c) for c in problem.costs)
        for limit in sorted({lo - 1, lo, hi, *(rng.randint(lo, hi) for _ in range(8))}):
            expected = brute_force(problem, limit)
            point = front.best_point(limit)
            if expected is None:
                assert point is None, f"limit {limit} below the cheapest recipe {lo} but DP found {point}"
                continue
            solution = front.best_under(limit)
            assert solution.cost <= limit
            assert solution.loss == pytest.approx(expected, abs=1e-12), f"DP {solution.loss} != brute {expected}"


def test_front_is_monotone_and_rebuilds_each_point() -> None:
    problem = random_problem(random.Random(7), 8, 5, costly=True)
    front = pareto_front(problem)
    assert all(a < b for a, b in zip(front.costs, front.costs[1:], strict=False)), "costs must strictly increase"
    assert all(a > b for a, b in zip(front.losses, front.losses[1:], strict=False)), "losses must strictly fall"
    for point in range(len(front)):
        solution = front.solution(point)
        assert solution.cost == front.costs[point]
        assert solution.loss == pytest.approx(float(front.losses[point]), abs=1e-12)


def test_no_solver_exceeds_its_budget() -> None:
    rng = random.Random(99)
    for _ in range(60):
        problem = random_problem(rng, rng.randint(2, 7), 6, costly=True)
        lo = sum(min(c) for c in problem.costs)
        hi = sum(max(c) for c in problem.costs)
        limit = rng.randint(lo, hi)
        front = pareto_front(problem)
        for solution in (front.best_under(limit), greedy(problem, limit), *front.near(limit, 4)):
            assert solution.cost <= limit, f"{solution.solver} costs {solution.cost} > budget {limit}"
            assert solution.cost == problem.cost(solution.assignment)
        assert front.best_under(limit).loss <= greedy(problem, limit).loss + 1e-12, "exact DP lost to greedy"


def exllamav3_optimize(meas: dict, budget: float) -> list[int]:
    """Transcription of exllamav3 conversion/optimize_model.py `optimize` (the reference for `greedy`)."""
    groups = meas["groups"]
    solution = [0] * len(groups)

    def adjust(dkld: float) -> float:
        return dkld if dkld > 0 else -((-dkld) ** 0.69)

    while True:
        best, best_r = None, 0.0
        for i, g in enumerate(groups):
            cand, s = g["candidates"], solution[i]
            for j, c in enumerate(cand):
                if j < s:
                    continue
                dk, db = adjust(c["dkld"]), c["dbits"]
                if s > 0:
                    dk -= adjust(cand[s - 1]["dkld"])
                    db -= cand[s - 1]["dbits"]
                r = 1e10 * dk / (db + 1)
                if r < best_r and budget > db:
                    best, best_r = (i, j, db), r
        if best is None:
            return solution
        i, j, db = best
        solution[i] = j + 1
        budget -= db


def _exllamav3_picks(problem: Problem, limit: int) -> list[int]:
    meas = {"groups": [{"candidates": [{"dkld": losses[j] - losses[0], "dbits": costs[j] - costs[0]}
                                       for j in range(1, len(costs))]}
                       for costs, losses in zip(problem.costs, problem.losses, strict=True)]}
    return exllamav3_optimize(meas, limit - sum(c[0] for c in problem.costs))


def test_greedy_reproduces_exllamav3_optimizer() -> None:
    rng = random.Random(5)
    for _ in range(40):
        problem = random_problem(rng, rng.randint(2, 8), 6, costly=True)
        limit = rng.randint(sum(min(c) for c in problem.costs), sum(max(c) for c in problem.costs))
        assert list(problem.indices(greedy(problem, limit).assignment)) == _exllamav3_picks(problem, limit)


def test_greedy_reproduces_exllamav3_optimizer_on_many_groups() -> None:
    """The heap's tie-breaking and its dropping of moves that stopped fitting match the full rescan."""
    rng = random.Random(11)
    for _ in range(4):
        problem = random_problem(rng, 60, 6, costly=True)
        lo, hi = sum(min(c) for c in problem.costs), sum(max(c) for c in problem.costs)
        limit = rng.randint(lo, (lo + hi) // 2)
        assert list(problem.indices(greedy(problem, limit).assignment)) == _exllamav3_picks(problem, limit)


def test_hull_points_are_exact_optima_at_their_cost() -> None:
    """Every point of the hull front is a recipe the exact DP cannot beat at the same cost."""
    rng = random.Random(21)
    for _ in range(20):
        problem = random_problem(rng, rng.randint(2, 12), 6, costly=True)
        hull, exact = hull_front(problem), exact_front(problem)
        assert all(a < b for a, b in zip(hull.costs, hull.costs[1:], strict=False))
        for point in range(len(hull)):
            solution = hull.solution(point)
            assert solution.cost == hull.costs[point]
            assert solution.loss == pytest.approx(float(hull.losses[point]), abs=1e-9)
            assert solution.loss == pytest.approx(exact.best_under(solution.cost).loss, abs=1e-9)


def test_hull_solution_fits_and_is_within_one_step_of_exact() -> None:
    rng = random.Random(31)
    for _ in range(40):
        problem = random_problem(rng, rng.randint(3, 30), 6, costly=True)
        lo, hi = sum(min(c) for c in problem.costs), sum(max(c) for c in problem.costs)
        limit = rng.randint(lo, hi)
        hull, exact = hull_front(problem).best_under(limit), exact_front(problem).best_under(limit)
        assert hull.cost <= limit and hull.cost == problem.cost(hull.assignment)
        step = max(max(v) - min(v) for v in problem.losses)
        assert exact.loss - 1e-9 <= hull.loss <= exact.loss + step, (hull.loss, exact.loss, step)
        assert all(s.cost <= limit for s in hull_front(problem).near(limit, 3))


def test_large_problems_fall_back_to_the_hull() -> None:
    problem = random_problem(random.Random(41), 40, 6, costly=True)
    assert isinstance(pareto_front(problem), ParetoFront)
    small_budget = pareto_front(problem, max_work=1_000)
    assert isinstance(small_budget, HullFront)
    limit = sum(min(c) for c in problem.costs) + 5_000
    assert small_budget.best_under(limit).solver == "hull"
    assert small_budget.best_under(limit).loss >= exact_front(problem).best_under(limit).loss - 1e-9


def synthetic_model_problem() -> Problem:
    """Four layers: attention, shared experts and routed experts (8x bigger), dense MLP in layer 0."""
    names, kinds, layers, params = [], [], [], []
    for layer in range(4):
        for kind, size in ((GroupKind.ATTENTION, 64), (GroupKind.DENSE_MLP if layer == 0 else
                                                        GroupKind.SHARED_EXPERTS, 128),
                           *(() if layer == 0 else ((GroupKind.ROUTED_EXPERTS, 1024),))):
            names.append(f"layers.{layer}.{kind.value}")
            kinds.append(kind)
            layers.append(layer)
            params.append(size * 64)
    widths = (2, 3, 4, 5, 6, 8)
    costs = tuple(tuple(p * b + p // 64 * 16 for b in widths) for p in params)
    losses = tuple(tuple(1.0 / p * 4.0 ** -b for b in widths) for p in params)
    return Problem(tuple(names), (widths,) * len(names), costs, losses, tuple(kinds), tuple(layers), tuple(params))


def test_uniform_and_hq_rule_baselines() -> None:
    problem = synthetic_model_problem()
    params = problem.total_params
    three = uniform(problem, 3)
    assert set(three.assignment.values()) == {3}
    assert three.cost == sum(c[1] for c in problem.costs)
    limit = int(3.0 * params)
    raw = hq_rule(problem, 3.0)
    for name, bits in raw.assignment.items():
        kind = problem.kinds[problem.names.index(name)]
        extra = {GroupKind.ATTENTION: 2, GroupKind.SHARED_EXPERTS: 2, GroupKind.DENSE_MLP: 1}.get(kind, 0)
        assert bits >= 3 + extra, f"--hq must clamp {name} to at least {3 + extra} bits, got {bits}"
    fitted = hq_at_budget(problem, limit)
    assert fitted.cost <= limit < raw.cost, "the raw --hq rule overshoots; the fitted one must not"


def test_isotonic_decreasing() -> None:
    assert isotonic_decreasing([3.0, 1.0, 2.0]) == pytest.approx([3.0, 1.5, 1.5])
    assert isotonic_decreasing([5.0, 4.0, 1.0]) == [5.0, 4.0, 1.0]
    weighted = isotonic_decreasing([1.0, 0.1, 0.3], [1.0, 3.0, 1.0])
    assert weighted == pytest.approx([1.0, 0.15, 0.15])
    rng = random.Random(3)
    for _ in range(50):
        values = [rng.random() for _ in range(6)]
        fit = isotonic_decreasing(values)
        assert all(a >= b - 1e-15 for a, b in zip(fit, fit[1:], strict=False))
        assert sum(fit) == pytest.approx(sum(values)), "unweighted PAVA preserves the sum"


# -- exact costs from real variants ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_table(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> CostTable:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    model_map = checkpoint.model_map("fine")
    work = tmp_path_factory.mktemp("work")
    variants = ensure_variants(checkpoint, model_map, [QuantConfig(bits=b, clip_search=False) for b in (2, 4)], work)
    return CostTable.from_variants(model_map, {v.bits: v for v in variants})


def test_costs_come_from_manifests(tiny_table: CostTable, tiny_model_dirs: dict[str, Path]) -> None:
    for bits in (2, 4):
        manifest_bits = sum(g.bits[bits] for g in tiny_table.groups)
        assignment = dict.fromkeys(tiny_table.names, bits)
        assert tiny_table.storage_bits(assignment) == manifest_bits
        naive = sum(g.params * (bits + 16 / 64) for g in tiny_table.groups)
        assert tiny_table.storage_bits(assignment) > naive, "partial scale groups (96 columns) cost extra"
    null = dict.fromkeys(tiny_table.names, 2)
    first = tiny_table.groups[0]
    null[first.name] = None
    assert tiny_table.storage_bits(null) - tiny_table.storage_bits(dict.fromkeys(tiny_table.names, 2)) == \
        NULL_BITS_PER_WEIGHT * first.params - first.bits[2]


def test_constraints_and_infeasible_budget(tiny_table: CostTable) -> None:
    constraints = Constraints(pins=parse_settings(["layers.0.attn.q=2"], "--pin"),
                              floors=parse_settings(["attention=4"], "--floor"))
    options = constraints.options(tiny_table)
    assert options["layers.0.attn.q"] == (2,), "a pin overrides a floor"
    assert options["layers.1.attn.kv"] == (4,)
    assert options["layers.1.experts.down"] == (2, 4)
    with pytest.raises(InfeasibleBudgetError, match=r"between \d\.\d{4} and \d\.\d{4} bpw"):
        budget = Budget(bpw=2.0)
        check_feasible(tiny_table, options, budget_limit_bits(budget, tiny_table), budget)
    check_feasible(tiny_table, options, budget_limit_bits(Budget(bpw=4.5), tiny_table), Budget(bpw=4.5))
    with pytest.raises(BudgetError, match="nearest: attention"):
        Constraints(floors={"atention": 5}).options(tiny_table)
    with pytest.raises(BudgetError, match="no width satisfies"):
        Constraints(floors={"attn": 5}).options(tiny_table)
    with pytest.raises(BudgetError, match="expected SELECTOR=BITS"):
        parse_settings(["attention"], "--floor")


def test_planned_costs_equal_manifest_costs(tiny_table: CostTable, tiny_model_dirs: dict[str, Path]) -> None:
    """The pre-measurement budget check uses the same exact accounting as the variants' manifests."""
    model_map = Checkpoint.open(tiny_model_dirs["qwen2_moe"]).model_map("fine")
    kinds = {g.kind for g in tiny_table.groups}
    planned = CostTable.from_configs(model_map, {b: QuantConfig(bits=b, clip_search=False) for b in (2, 4)}, kinds)
    assert planned.groups == tiny_table.groups


def test_measurement_losses_are_monotone_in_bits(tmp_path: Path) -> None:
    import pandas as pd

    from mixprec.measure.table import Measurement
    from mixprec.search.estimate import measurement_losses

    drop = pd.DataFrame({"group": ["a"] * 4 + ["b"] * 4, "bits": [2, 3, 4, 8] * 2, "mode": "drop", "base_bits": 16,
                         "dkl": [1e-1, 1e-2, 2e-5, 3e-5, 5e-2, 6e-3, 1e-3, 1e-4],
                         "dkl_se": [1e-3, 1e-4, 1e-5, 1e-5, 1e-3, 1e-4, 1e-5, 1e-6]})
    losses = measurement_losses(Measurement(tmp_path, drop, {}))
    assert losses["b"] == {2: 5e-2, 3: 6e-3, 4: 1e-3, 8: 1e-4}, "monotone rows are kept as measured"
    assert losses["a"][4] == losses["a"][8] == pytest.approx(2.5e-5), "4->8 rise at the noise floor is pooled"
    raised = pd.DataFrame({"group": ["a"] * 3, "bits": [3, 4, 8], "mode": "raise", "base_bits": 2,
                           "dkl": [-0.05, -0.06, -0.0605], "dkl_se": [1e-3, 1e-3, 1e-3]})
    assert measurement_losses(Measurement(tmp_path, raised, {}))["a"] == {2: 0.0, 3: -0.05, 4: -0.06, 8: -0.0605}


def test_tied_solutions_keep_blocks_at_one_width() -> None:
    problem = synthetic_model_problem()
    split = Problem(tuple(n + s for n in problem.names for s in (".a", ".b")),
                    tuple(o for o in problem.options for _ in range(2)),
                    tuple(tuple(c // 2 for c in cs) for cs in problem.costs for _ in range(2)),
                    tuple(tuple(v * f for v in ls) for ls in problem.losses for f in (0.3, 0.7)),
                    tuple(k for k in problem.kinds for _ in range(2)),
                    tuple(x for x in problem.layers for _ in range(2)),
                    tuple(p // 2 for p in problem.params for _ in range(2)))
    limit = int(3.0 * split.total_params)
    solutions = tied_solutions(split, limit)
    assert {s.solver for s in solutions} == {"dp-block", "greedy-block", "dp-kind", "greedy-kind"}
    exact = pareto_front(split).best_under(limit)
    for solution in solutions:
        assert solution.cost <= limit
        assert solution.loss >= exact.loss - 1e-15, "a tied recipe cannot beat the untied optimum"
        for name in problem.names:
            assert solution.assignment[name + ".a"] == solution.assignment[name + ".b"], f"{solution.solver} split"
    kind = next(s for s in solutions if s.solver == "dp-kind")
    for k in set(problem.kinds):
        widths = {kind.assignment[n] for n, kk in zip(split.names, split.kinds, strict=True) if kk is k}
        assert len(widths) == 1, f"dp-kind gives {k} several widths {widths}"


def test_compressed_problem_reproduces_greedys_objective() -> None:
    problem = synthetic_model_problem()
    plain = compressed(problem, 1.0)
    for row, original in zip(plain.losses, problem.losses, strict=True):
        assert row == pytest.approx(tuple(min(v - original[0], 0.0) for v in original)), "p=1 is a constant shift"
    hedged = compressed(problem, 0.69)
    row = problem.losses[0]
    assert hedged.losses[0][1] == pytest.approx(-((row[0] - row[1]) ** 0.69))
    limit = int(3.5 * problem.total_params)
    solutions = compressed_solutions(problem, limit)
    assert [s.solver for s in solutions] == ["dp-p0.5", "dp-p0.69", "dp-p0.85"]
    for power, solution in zip((0.5, 0.69, 0.85), solutions, strict=True):
        assert solution.cost <= limit
        assert solution.loss == pytest.approx(problem.loss(solution.assignment)), "reported loss is uncompressed"
        squeezed = compressed(problem, power)
        best = pareto_front(squeezed).best_under(limit).loss
        assert squeezed.loss(solution.assignment) == pytest.approx(best), "exact under its own compression"
    assert squeezed.loss(greedy(problem, limit).assignment) >= best - 1e-12
