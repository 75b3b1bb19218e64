"""Solvers on the additive estimate: exact Pareto DP, exllamav3's greedy, and the rule baselines.

The search problem is a multiple-choice knapsack: every group picks one option (a bit width), each
option has an exact cost (storage bits from the variants' manifests) and an estimated loss (its KL
from the sensitivity table); the estimate of a recipe is the sum of its groups' losses, which ranks
recipes well in the medium-bit regime (HIGGS' linearity theorem, FIELD.md §2.3, §9.5).

* `pareto_front` solves it exactly for **every** budget at once: a DP over groups that keeps only
  (cost, loss) points no other point beats on both, with back-pointers to rebuild each recipe.
  Equal-size groups make many sums coincide, so the front stays small (hundreds to a few thousand
  points for tens of groups). Its work grows with groups x front size, i.e. quadratically: a width per
  routed expert of a 256-expert, 58-layer model (15,000-30,000 groups) would take hours and tens of GiB
  of back-pointers, so past `EXACT_WORK` it returns a `HullFront` instead: the lower convex hull of
  the front, every point of which is optimal at its own cost (Lagrangian relaxation), with the budget's
  leftover bits spent by the ascent below. Its loss at a budget is within one group's step of the
  exact optimum, a gap that shrinks as groups multiply (measured in `benchmarks/search_scale.py`).
* `greedy` is exllamav3's `optimize_model.py` allocation, reproduced as a baseline (ΔKL per added
  bit, negative ΔKL compressed by a 0.69 power, strictly improving moves that fit). Moves live in a
  heap, so it takes O(moves log moves) instead of exllamav3's rescan of every group per step.
* `uniform` and `hq_rule` are the rule baselines: every group at one width, and exllamav3's
  allocation with `--hq` (attention +2, shared experts +2, dense MLP +1), fitted to the same budget.
* `isotonic_decreasing` cleans a noisy table: more bits must not cost more KL, and entries at the
  noise floor are often out of order (FIELD.md §9.4).

All solvers are pure functions of a `Problem`; none of them imports Optuna or torch.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mixprec.core.errors import MixprecError
from mixprec.model.arch import GroupKind
from mixprec.quant.options import option_width
from mixprec.search.costs import CostTable, Option

__all__ = [
    "Problem",
    "Solution",
    "ParetoFront",
    "HullFront",
    "pareto_front",
    "exact_front",
    "hull_front",
    "ascend",
    "EXACT_WORK",
    "greedy",
    "uniform",
    "hq_rule",
    "hq_at_budget",
    "HQ_EXTRA_BITS",
    "isotonic_decreasing",
    "tie_groups",
    "tied_solutions",
    "compressed",
    "compressed_solutions",
    "COMPRESSION_POWERS",
]

#: Budget of the exact DP in (front point x option) pairs folded, summed over groups: about 1 s and
#: 40 MB of back-pointers (the bundled model's 84 groups x 18 options need 5e6). Larger problems get the
#: convex-hull front (`hull_front`), 0.00-0.14% above the exact optimum where both run (search_scale.py).
EXACT_WORK = 20_000_000

#: Powers tried by `compressed_solutions` (0.69 is exllamav3's; 1.0 is the plain estimate).
COMPRESSION_POWERS = (0.5, 0.69, 0.85)

#: exllamav3 `select_hq_bits` per kind (glm4_moe / deepseek_v3 / ernie4_5_moe architecture files).
HQ_EXTRA_BITS = {GroupKind.ATTENTION: 2, GroupKind.SHARED_EXPERTS: 2, GroupKind.DENSE_MLP: 1,
                 GroupKind.ROUTED_EXPERTS: 0}
#: exllamav3 promotion priority: `q_priority` = 2 + hq bits for attention, 1 + hq bits for MLPs, 0 for experts.
_PRIORITY = {GroupKind.ATTENTION: 4, GroupKind.SHARED_EXPERTS: 3, GroupKind.DENSE_MLP: 2,
             GroupKind.ROUTED_EXPERTS: 0}


@dataclass(frozen=True)
class Problem:
    """Per group: options (bit widths, ascending), their exact costs (bits) and additive losses."""

    names: tuple[str, ...]
    options: tuple[tuple[Option, ...], ...]
    costs: tuple[tuple[int, ...], ...]
    losses: tuple[tuple[float, ...], ...]
    kinds: tuple[GroupKind, ...] = ()
    layers: tuple[int | None, ...] = ()
    params: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n or len(self.options) != n or len(self.costs) != n or len(self.losses) != n:
            raise MixprecError("a problem needs one options, costs and losses row per group (and at least one group)")
        for name, opts, costs, losses in zip(self.names, self.options, self.costs, self.losses, strict=True):
            if not opts or len(costs) != len(opts) or len(losses) != len(opts):
                raise MixprecError(f"group {name!r}: options, costs and losses must be non-empty and equally long")
            if any(not math.isfinite(v) for v in losses):
                raise MixprecError(f"group {name!r}: losses must be finite, got {losses}")

    @classmethod
    def build(cls, table: CostTable, options: Mapping[str, Sequence[Option]],
              losses: Mapping[str, Mapping[Option, float]]) -> Problem:
        """Assemble a problem from exact costs, allowed options and per-group losses (None = 0 loss)."""
        rows = []
        for g in table.groups:
            # by width, then cost: ascending cost for widths and for option labels alike (a bit of width
            # outweighs any group size's scales), which greedy and the moves assume
            opts = sorted(options[g.name], key=lambda o: (o is None, option_width(o), g.cost(o), str(o)))
            missing = [o for o in opts if o is not None and o not in losses.get(g.name, {})]
            if missing:
                raise MixprecError(f"group {g.name!r}: the sensitivity table has no loss at {missing} bits; "
                                   "re-run `mixprec measure` with those widths or restrict the widths searched")
            rows.append((tuple(opts), tuple(g.cost(o) for o in opts),
                         tuple(0.0 if o is None else float(losses[g.name][o]) for o in opts)))
        return cls(tuple(table.names), *map(tuple, zip(*rows, strict=True)),  # type: ignore[arg-type]
                   tuple(g.kind for g in table.groups), tuple(g.layer for g in table.groups),
                   tuple(g.params for g in table.groups))

    def indices(self, assignment: Mapping[str, Option]) -> tuple[int, ...]:
        return tuple(self.options[i].index(assignment[n]) for i, n in enumerate(self.names))

    def assignment(self, indices: Sequence[int]) -> dict[str, Option]:
        return {n: self.options[i][int(k)] for i, (n, k) in enumerate(zip(self.names, indices, strict=True))}

    def cost(self, assignment: Mapping[str, Option]) -> int:
        return sum(self.costs[i][k] for i, k in enumerate(self.indices(assignment)))

    def loss(self, assignment: Mapping[str, Option]) -> float:
        return float(sum(self.losses[i][k] for i, k in enumerate(self.indices(assignment))))

    def solution(self, assignment: Mapping[str, Option], solver: str) -> Solution:
        assignment = {n: assignment[n] for n in self.names}
        return Solution(assignment, self.cost(assignment), self.loss(assignment), solver)

    @property
    def total_params(self) -> int:
        return sum(self.params)


@dataclass(frozen=True)
class Solution:
    """An assignment with its exact cost (bits) and additive loss, and the solver that made it."""

    assignment: dict[str, Option]
    cost: int
    loss: float
    solver: str
    extra: dict[str, float] = field(default_factory=dict)


class _Front:
    """What both fronts share: recipes by ascending cost (`costs`), looked up by budget; `indices` rebuilds one."""

    problem: Problem
    costs: np.ndarray
    label = "front"

    def __len__(self) -> int:
        return int(self.costs.size)

    def indices(self, point: int) -> list[int]:
        raise NotImplementedError

    def solution(self, point: int, solver: str | None = None) -> Solution:
        return self.problem.solution(self.problem.assignment(self.indices(point)), solver or self.label)

    def best_point(self, limit_bits: int) -> int | None:
        """Index of the lowest-loss point within `limit_bits` (the most expensive that fits), or None."""
        point = int(np.searchsorted(self.costs, limit_bits, side="right")) - 1
        return None if point < 0 else point

    def _point_under(self, limit_bits: int) -> int:
        point = self.best_point(limit_bits)
        if point is None:
            raise MixprecError(f"no recipe costs at most {limit_bits} bits; the cheapest costs {int(self.costs[0])}")
        return point


@dataclass
class ParetoFront(_Front):
    """Every cost-optimal recipe of a problem: costs ascending, losses strictly descending."""

    problem: Problem
    costs: np.ndarray
    losses: np.ndarray
    _parents: list[np.ndarray] = field(repr=False)
    _choices: list[np.ndarray] = field(repr=False)
    label = "dp"

    def indices(self, point: int) -> list[int]:
        """Option index per group of front point `point`, rebuilt from the back-pointers."""
        picks = [0] * len(self._choices)
        for stage in range(len(self._choices) - 1, -1, -1):
            picks[stage] = int(self._choices[stage][point])
            point = int(self._parents[stage][point])
        return picks

    def best_under(self, limit_bits: int) -> Solution:
        return self.solution(self._point_under(limit_bits))

    def near(self, limit_bits: int, count: int) -> list[Solution]:
        """The best point under the limit and the `count - 1` next cheaper points (seeds for the search)."""
        best = self.best_point(limit_bits)
        if best is None:
            return []
        points = range(best, max(-1, best - count), -1)
        return [self.solution(p, "dp" if p == best else f"dp-{best - p}") for p in points]


class _TooLarge(Exception):
    """The exact DP passed its work budget (internal: `pareto_front` falls back to the hull)."""


def pareto_front(problem: Problem, max_work: int = EXACT_WORK) -> ParetoFront | HullFront:
    """Exact multiple-choice knapsack for all budgets, or its convex hull when that would be too slow."""
    try:
        return exact_front(problem, max_work)
    except _TooLarge:
        return hull_front(problem)


def exact_front(problem: Problem, max_work: int | None = None) -> ParetoFront:
    """Fold groups in one at a time, keeping the non-dominated (cost, loss) points and back-pointers."""
    costs = np.zeros(1, dtype=np.int64)
    losses = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    work = 0
    for done, (option_costs, option_losses) in enumerate(zip(problem.costs, problem.losses, strict=True)):
        k = len(option_costs)
        work += costs.size * k
        if max_work is not None and work + _work_ahead(costs.size, done, problem.costs[done:]) > max_work:
            raise _TooLarge
        all_costs = (costs[:, None] + np.asarray(option_costs, dtype=np.int64)[None, :]).ravel()
        all_losses = (losses[:, None] + np.asarray(option_losses, dtype=np.float64)[None, :]).ravel()
        order = np.lexsort((all_losses, all_costs))  # by cost, then loss
        all_costs, all_losses = all_costs[order], all_losses[order]
        running = np.minimum.accumulate(all_losses)
        keep = np.empty(all_losses.size, dtype=bool)
        keep[0] = True
        keep[1:] = all_losses[1:] < running[:-1]  # strictly better than every cheaper-or-equal point
        kept = order[keep]
        parents.append((kept // k).astype(np.int64))
        choices.append((kept % k).astype(np.int16))
        costs, losses = all_costs[keep], all_losses[keep]
    return ParetoFront(problem, costs, losses, parents, choices)


def _work_ahead(front: int, done: int, ahead: Sequence[Sequence[int]]) -> float:
    """The DP's remaining work if the front keeps growing at its average rate so far (it grows about
    linearly with the groups folded in), so a problem too large is given up early, not at the limit."""
    growth = front / max(done, 1)
    return float(sum(len(c) * (front + growth * j) for j, c in enumerate(ahead, start=1)))


def _group_hull(costs: Sequence[int], losses: Sequence[float]) -> list[int]:
    """Option indices on one group's lower convex hull, from its cheapest (lowest loss among the
    cheapest) to its lowest-loss option: the only options a Lagrangian solution ever picks."""
    order = sorted(range(len(costs)), key=lambda k: (costs[k], losses[k]))
    hull: list[int] = []
    for k in order:
        if hull and (costs[k] == costs[hull[-1]] or losses[k] >= losses[hull[-1]]):
            continue  # same cost but worse, or costs more without losing less
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]  # drop b if it lies on or above the chord a-k
            if (losses[b] - losses[a]) * (costs[k] - costs[a]) >= (losses[k] - losses[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


@dataclass
class HullFront(_Front):
    """The lower convex hull of the Pareto front, for problems too large for the exact DP.

    Every group walks its own hull; the hull segments of all groups, taken in order of loss saved per
    bit (steepest first), trace the global hull: point m takes the first m segments. Convexity keeps each
    group's segments in its own order, so every point is a valid recipe and optimal at its own cost.
    `best_under` then spends the bits left below the budget on the best affordable moves (`ascend`).
    """

    problem: Problem
    costs: np.ndarray
    losses: np.ndarray
    _hulls: list[list[int]] = field(repr=False)
    _segment_groups: np.ndarray = field(repr=False)
    label = "hull"

    def indices(self, point: int) -> list[int]:
        steps = np.bincount(self._segment_groups[:point], minlength=len(self._hulls))
        return [hull[int(s)] for hull, s in zip(self._hulls, steps, strict=True)]

    def best_under(self, limit_bits: int) -> Solution:
        picks = ascend(self.problem, self.indices(self._point_under(limit_bits)), limit_bits, _raw_gain)
        return self.problem.solution(self.problem.assignment(picks), "hull")

    def near(self, limit_bits: int, count: int) -> list[Solution]:
        """The filled hull point under the limit and the `count - 1` next cheaper hull points."""
        best = self.best_point(limit_bits)
        if best is None:
            return []
        cheaper = range(best - 1, max(-1, best - count), -1)
        return [self.best_under(limit_bits), *(self.solution(p, f"hull-{best - p}") for p in cheaper)]


def hull_front(problem: Problem) -> HullFront:
    """All groups' hull segments merged by slope (stable: ties keep group, then hull order)."""
    hulls = [_group_hull(c, v) for c, v in zip(problem.costs, problem.losses, strict=True)]
    groups, d_costs, d_losses = [], [], []
    for i, hull in enumerate(hulls):
        for a, b in zip(hull, hull[1:], strict=False):
            groups.append(i)
            d_costs.append(problem.costs[i][b] - problem.costs[i][a])
            d_losses.append(problem.losses[i][b] - problem.losses[i][a])
    group_ids = np.asarray(groups, dtype=np.int64)
    d_cost = np.asarray(d_costs, dtype=np.int64)
    d_loss = np.asarray(d_losses, dtype=np.float64)
    order = np.lexsort((np.arange(group_ids.size), d_loss / np.maximum(d_cost, 1)))
    start_cost = sum(problem.costs[i][h[0]] for i, h in enumerate(hulls))
    start_loss = float(sum(problem.losses[i][h[0]] for i, h in enumerate(hulls)))
    costs = np.concatenate(([start_cost], start_cost + np.cumsum(d_cost[order]))).astype(np.int64)
    losses = np.concatenate(([start_loss], start_loss + np.cumsum(d_loss[order])))
    return HullFront(problem, costs, losses, hulls, group_ids[order])


def _raw_gain(losses: Sequence[float], current: int, option: int) -> float:
    return losses[option] - losses[current]


def ascend(problem: Problem, picks: Sequence[int], limit_bits: int,
           gain: Callable[[Sequence[float], int, int], float], strict: bool = False) -> list[int]:
    """From `picks`, repeatedly take the (group, other option) move with the most negative `gain` per
    added bit that fits the bits left (`strict`: leaves at least one bit, exllamav3's test), until none does.

    Moves sit in a heap keyed (ratio, group, option), so ties go to the lowest group and option, as in a
    scan; a move that no longer fits never will (the bits left only shrink), and moves of a group that
    has moved since are dropped when they surface.
    """
    picks = list(picks)
    left = limit_bits - sum(problem.costs[i][k] for i, k in enumerate(picks))
    heap = [move for i in range(len(picks)) for move in _moves(problem, picks, i, gain)]
    heapq.heapify(heap)
    while heap:
        _, i, j, start = heapq.heappop(heap)
        if picks[i] != start:
            continue
        added = problem.costs[i][j] - problem.costs[i][start]
        if added > left or (strict and added == left):
            continue
        picks[i], left = j, left - added
        for move in _moves(problem, picks, i, gain):
            heapq.heappush(heap, move)
    return picks


def _moves(problem: Problem, picks: Sequence[int], i: int,
           gain: Callable[[Sequence[float], int, int], float]) -> list[tuple[float, int, int, int]]:
    """Improving moves of group i to a later (costlier) option, as (ratio, group, option, current option)."""
    s, costs, losses = picks[i], problem.costs[i], problem.losses[i]
    found = []
    for j in range(s + 1, len(costs)):
        added = costs[j] - costs[s]
        ratio = 1e10 * gain(losses, s, j) / (added + 1)
        if ratio < 0.0:
            found.append((ratio, i, j, s))
    return found


def _adjust(dkl: float) -> float:
    """exllamav3's compression of improvements: -(|ΔKL|^0.69) for negative ΔKL."""
    return dkl if dkl > 0 else -((-dkl) ** 0.69)


def _adjusted_gain(losses: Sequence[float], current: int, option: int) -> float:
    return _adjust(losses[option] - losses[0]) - _adjust(losses[current] - losses[0])


def greedy(problem: Problem, limit_bits: int) -> Solution:
    """exllamav3 `optimize_model.optimize`: start every group at its cheapest option, then repeatedly take
    the (group, higher option) move with the most negative adjusted ΔKL per added bit that fits."""
    picks = ascend(problem, [0] * len(problem.names), limit_bits, _adjusted_gain, strict=True)
    return problem.solution(problem.assignment(picks), "greedy")


def _nearest_index(options: tuple[Option, ...], bits: int, at_least: bool = False) -> int:
    widths = [(-1 if o is None else option_width(o)) for o in options]
    if at_least and any(w >= bits for w in widths):
        return min((w, i) for i, w in enumerate(widths) if w >= bits)[1]
    return min((abs(w - bits), -w, i) for i, w in enumerate(widths))[2]


def uniform(problem: Problem, bits: int) -> Solution:
    """Every group at `bits` (pinned or bounded groups at their nearest allowed width)."""
    picks = [_nearest_index(opts, bits) for opts in problem.options]
    return problem.solution(problem.assignment(picks), f"uniform-{bits}")


def _hq_order(problem: Problem) -> list[int]:
    """exllamav3 promotion order: priority, then distance from the nearer end of the layer stack, layer."""
    layers = [layer for layer in problem.layers if layer is not None]
    top = max(layers, default=0)

    def key(i: int) -> tuple[int, int, int, int]:
        layer = problem.layers[i]
        dist = 0 if layer is None else min(layer, top - layer)
        return (-_PRIORITY.get(problem.kinds[i], 0), dist, -1 if layer is None else layer, i)

    return sorted(range(len(problem.names)), key=key)


def hq_rule(problem: Problem, target_bpw: float, hq: bool = True) -> Solution:
    """exllamav3 `create_q_strategy`: floor(bpw) everywhere, +1-bit promotions in priority order while they
    fit `target_bpw`, then (with `hq`) attention, shared experts and dense MLP clamped to base + extra bits.

    Costs are the exact variant costs; as in exllamav3 the clamp may push the result over the target
    (see `hq_at_budget` for the same rule fitted to a budget).
    """
    base = int(math.floor(target_bpw))
    max_bits = int(target_bpw * problem.total_params)
    picks = [_nearest_index(opts, base) for opts in problem.options]
    total = sum(problem.costs[i][k] for i, k in enumerate(picks))
    order = _hq_order(problem)
    updated = True
    while total < max_bits and updated:
        updated = False
        for i in order:
            if picks[i] + 1 >= len(problem.options[i]):
                continue
            delta = problem.costs[i][picks[i] + 1] - problem.costs[i][picks[i]]
            if delta > 0 and total + delta <= max_bits:
                picks[i] += 1
                total += delta
                updated = True
    if hq:
        for i, kind in enumerate(problem.kinds):
            floor_index = _nearest_index(problem.options[i], base + HQ_EXTRA_BITS.get(kind, 0), at_least=True)
            picks[i] = max(picks[i], floor_index)
    return problem.solution(problem.assignment(picks), "hq" if hq else "exl3-default")


def hq_at_budget(problem: Problem, limit_bits: int, step: float = 0.005) -> Solution:
    """`hq_rule` at the highest target bpw whose result (clamps included) fits `limit_bits`."""
    target = limit_bits / problem.total_params
    while target > 0:
        solution = hq_rule(problem, target)
        if solution.cost <= limit_bits:
            return Solution(solution.assignment, solution.cost, solution.loss, "hq", {"target_bpw": round(target, 4)})
        target -= step
    raise MixprecError("the --hq rule cannot fit this budget at any target")


def isotonic_decreasing(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Weighted least-squares fit that never increases along `values` (pool adjacent violators).

    Used per group over ascending bit widths: a measured KL that rises with more bits is noise at
    the floor, and pooling it with its neighbour (weighted by 1/SE²) keeps solvers from chasing it.
    """
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for v, w in zip(values, weights or [1.0] * len(values), strict=True):
        blocks.append([float(v), max(float(w), 1e-300), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, w2, c2), (m1, w1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [m for m, _, c in blocks for _ in range(int(c))]


def tie_groups(problem: Problem, key: Callable[[int], Hashable]) -> tuple[Problem, list[list[int]]]:
    """The problem with groups of equal `key(i)` forced to one width (options common to all, costs and
    losses summed); returns it and the member indices of each tied group. Pinned groups stay alone."""
    members: dict[Hashable, list[int]] = {}
    for i in range(len(problem.names)):
        alone = len(problem.options[i]) == 1
        members.setdefault(("pinned", i) if alone else key(i), []).append(i)
    names, options, costs, losses = [], [], [], []
    for tied in members.values():
        common = [o for o in problem.options[tied[0]] if all(o in problem.options[i] for i in tied)]
        if not common:
            raise MixprecError(f"groups {[problem.names[i] for i in tied]} share no width and cannot be tied")
        names.append("+".join(problem.names[i] for i in tied))
        options.append(tuple(common))
        costs.append(tuple(sum(problem.costs[i][problem.options[i].index(o)] for i in tied) for o in common))
        losses.append(tuple(sum(problem.losses[i][problem.options[i].index(o)] for i in tied) for o in common))
    tied_problem = Problem(tuple(names), tuple(options), tuple(costs), tuple(losses),
                           tuple(problem.kinds[t[0]] for t in members.values()) if problem.kinds else (),
                           tuple(problem.layers[t[0]] for t in members.values()) if problem.layers else (),
                           tuple(sum(problem.params[i] for i in t) for t in members.values()) if problem.params
                           else ())
    return tied_problem, list(members.values())


def tied_solutions(problem: Problem, limit_bits: int) -> list[Solution]:
    """DP and greedy with widths tied per (layer, kind) block and per kind: coarse structures that a
    search at fine granularity should start from too, because the estimate is least reliable when it
    splits a block (FIELD.md §9.5)."""
    keys: dict[str, Callable[[int], Hashable]] = {
        "block": lambda i: (problem.layers[i], problem.kinds[i]),
        "kind": lambda i: problem.kinds[i],
    }
    found: list[Solution] = []
    for label, key in keys.items():
        tied, members = tie_groups(problem, key)
        if len(tied.names) == len(problem.names) or sum(min(c) for c in tied.costs) > limit_bits:
            continue
        solved = (("dp", pareto_front(tied).best_under(limit_bits)), ("greedy", greedy(tied, limit_bits)))
        for solver, solution in solved:
            assignment = {problem.names[i]: solution.assignment[name]
                          for name, group in zip(tied.names, members, strict=True) for i in group}
            found.append(problem.solution(assignment, f"{solver}-{label}"))
    return found


def compressed(problem: Problem, power: float) -> Problem:
    """The problem with each group's improvement over its cheapest option raised to `power` (< 1 shrinks
    large improvements relative to small ones).

    Drop-one KL is sub-additive on real models: when most groups are quantized, protecting the single
    most sensitive group buys less than its drop-one KL promises. exllamav3's greedy hedges with a
    0.69 power; solving the compressed problem exactly gives the best recipe under that hedge, and
    the search picks the power whose ranking agrees best with the composed KL it has measured.
    """
    losses = tuple(tuple(-(max(row[0] - v, 0.0) ** power) for v in row) for row in problem.losses)
    return Problem(problem.names, problem.options, problem.costs, losses, problem.kinds, problem.layers,
                   problem.params)


def compressed_solutions(problem: Problem, limit_bits: int,
                         powers: Sequence[float] = COMPRESSION_POWERS) -> list[Solution]:
    """Exact DP solutions at the budget under each compression power (losses reported uncompressed)."""
    found = []
    for power in powers:
        solution = pareto_front(compressed(problem, power)).best_under(limit_bits)
        found.append(problem.solution(solution.assignment, f"dp-p{power:g}"))
    return found
