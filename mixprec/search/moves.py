"""Budget-preserving local moves on a recipe, guided by the additive estimate (no Optuna, no torch).

The search refines proxy solutions on the composed model, so its proposals must stay within the
budget by construction and near the proxy's efficient frontier, while still trying what the proxy
gets wrong (synergies, FIELD.md §3 row 2). A move therefore changes one group at random (one level
up or down) and lets the estimate decide how to pay for it: after a raise, other groups are lowered
where the estimated harm per freed bit is smallest until the recipe fits; after a lower, the freed
bits go where the estimated gain per bit is largest. This is EvoPress's level-switch mutation
generalised to groups of unequal size. `repair` applies the same two steps to any proposal, which
makes samplers that ignore the budget (TPE, random) usable too.

A recipe here is a list of option indices, one per group of a `mixprec.search.solve.Problem`, options
ascending in cost.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence

from mixprec.core.errors import MixprecError
from mixprec.search.solve import Problem

__all__ = ["total_cost", "lower_until_fits", "fill", "repair", "blocks", "mutate"]


def total_cost(problem: Problem, picks: Sequence[int]) -> int:
    return sum(problem.costs[i][k] for i, k in enumerate(picks))


Candidate = tuple[float, int]  # (estimated harm or -gain per bit, group index): sorted, best first


def _take(heap: list[Candidate], usable: Callable[[int], bool], rng: random.Random | None, top: int) -> int | None:
    """The best usable candidate, or (exploring) a random one of the `top` best; None when none is usable.

    Candidates that are not usable are dropped for good (the caller's budget only moves one way), the
    others examined go back, so this picks exactly what sorting every candidate would, in O(top log n).
    """
    want = 1 if rng is None or top <= 1 else top
    ready: list[Candidate] = []
    while heap and len(ready) < want:
        candidate = heapq.heappop(heap)
        if usable(candidate[1]):
            ready.append(candidate)
    if not ready:
        return None
    chosen = ready.pop(0 if want == 1 else rng.randrange(len(ready)))  # type: ignore[union-attr]
    for candidate in ready:
        heapq.heappush(heap, candidate)
    return chosen[1]


def _lower_candidate(problem: Problem, picks: Sequence[int], i: int) -> Candidate:
    k = picks[i]
    freed = problem.costs[i][k] - problem.costs[i][k - 1]
    return (problem.losses[i][k - 1] - problem.losses[i][k]) / max(freed, 1), i


def lower_until_fits(problem: Problem, picks: list[int], limit: int, rng: random.Random | None = None,
                     top: int = 1, frozen: frozenset[int] = frozenset()) -> list[int]:
    """Lower groups one level at a time, least estimated harm per freed bit first, until the cost fits."""
    picks = list(picks)
    cost = total_cost(problem, picks)
    heap = [_lower_candidate(problem, picks, i) for i, k in enumerate(picks) if k > 0 and i not in frozen]
    heapq.heapify(heap)
    while cost > limit:
        i = _take(heap, lambda _: True, rng, top)
        if i is None:
            if frozen:  # give up the protection rather than leave the recipe over budget
                return lower_until_fits(problem, picks, limit, rng, top)
            raise MixprecError(f"cannot fit {limit} bits: every group is already at its cheapest option")
        cost -= problem.costs[i][picks[i]] - problem.costs[i][picks[i] - 1]
        picks[i] -= 1
        if picks[i] > 0:
            heapq.heappush(heap, _lower_candidate(problem, picks, i))
    return picks


def _raise_candidate(problem: Problem, picks: Sequence[int], i: int) -> Candidate | None:
    k = picks[i]
    if k + 1 >= len(problem.costs[i]):
        return None
    extra = problem.costs[i][k + 1] - problem.costs[i][k]
    gain = problem.losses[i][k] - problem.losses[i][k + 1]
    return (-gain / max(extra, 1), i) if gain > 0 else None


def fill(problem: Problem, picks: list[int], limit: int, rng: random.Random | None = None, top: int = 1,
         frozen: frozenset[int] = frozenset()) -> list[int]:
    """Raise groups one level at a time, largest estimated gain per added bit first, while they fit."""
    picks = list(picks)
    cost = total_cost(problem, picks)
    heap = [c for i in range(len(picks)) if i not in frozen and (c := _raise_candidate(problem, picks, i))]
    heapq.heapify(heap)

    def fits(i: int) -> bool:
        return cost + problem.costs[i][picks[i] + 1] - problem.costs[i][picks[i]] <= limit

    while (i := _take(heap, fits, rng, top)) is not None:
        cost += problem.costs[i][picks[i] + 1] - problem.costs[i][picks[i]]
        picks[i] += 1
        candidate = _raise_candidate(problem, picks, i)
        if candidate is not None:
            heapq.heappush(heap, candidate)
    return picks


def repair(problem: Problem, picks: Sequence[int], limit: int) -> list[int]:
    """Make any proposal fit the budget (lowering) and use what is left (filling), deterministically."""
    return fill(problem, lower_until_fits(problem, list(picks), limit), limit)


def blocks(problem: Problem) -> list[list[int]]:
    """Indices of groups sharing a layer and kind (e.g. a layer's q, kv and o) when there are several."""
    found: dict[tuple[object, object], list[int]] = {}
    for i, key in enumerate(zip(problem.layers, problem.kinds, strict=False)):
        if len(problem.costs[i]) > 1:
            found.setdefault(key, []).append(i)
    return [members for members in found.values() if len(members) > 1]


def mutate(problem: Problem, picks: Sequence[int], limit: int, rng: random.Random, moves: int = 1,
           top: int = 3, units: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Apply `moves` random one-level changes, each paid for (or spent) by the estimate; stays within `limit`.

    A move changes one unit: a single group, or one of `units` (blocks of groups moved together, so
    a search at fine granularity can also shift a whole layer block as a coarse search would).
    """
    child = list(picks)
    singles = [[i] for i, costs in enumerate(problem.costs) if len(costs) > 1]
    pool = singles + [list(u) for u in (units or ())]
    if not singles:
        return child
    for _ in range(moves):
        unit = rng.choice(pool)
        frozen = frozenset(unit)
        raisable = [i for i in unit if child[i] + 1 < len(problem.costs[i])]
        lowerable = [i for i in unit if child[i] > 0]
        if raisable and (not lowerable or rng.random() < 0.5):
            for i in raisable:
                child[i] += 1
            child = lower_until_fits(problem, child, limit, rng, top, frozen=frozen)
        else:
            for i in lowerable:
                child[i] -= 1
        child = fill(problem, child, limit, rng, top, frozen=frozen)
    return child
