"""The search's proposal strategy: an Optuna `BaseSampler` of budget-preserving local moves.

Kept apart from `mixprec.search.study` (the study, objective and storage) only for size; together the two
modules are the only places the search touches Optuna.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from mixprec.search.correct import fit
from mixprec.search.moves import blocks, fill, lower_until_fits, mutate, total_cost
from mixprec.search.solve import COMPRESSION_POWERS, Problem, compressed

__all__ = ["LocalMoveSampler", "completed", "feasible"]


def feasible(trial: FrozenTrial) -> bool:
    """A finished trial of the search whose recipe met every constraint (the budget)."""
    return all(v <= 0 for v in trial.constraints.values()) and "levels" in trial.user_attrs


def completed(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The possible parents, by number: completed feasible trials. A pruned (screened) trial is left out: its
    KL covers a few windows only, and it lost there to a completed one."""
    return sorted((t for t in trials if t.state == TrialState.COMPLETE and feasible(t)), key=lambda t: t.number)


def _concordance(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Kendall-style agreement in [-1, 1] between two rankings (0 when fewer than two trials)."""
    score, pairs = 0, 0
    for i in range(len(predicted)):
        for j in range(i + 1, len(predicted)):
            a, b = predicted[i] - predicted[j], measured[i] - measured[j]
            if a and b:
                score += 1 if (a > 0) == (b > 0) else -1
                pairs += 1
    return score / pairs if pairs else 0.0


class LocalMoveSampler(optuna.samplers.BaseSampler):
    """Children of the best measured recipes through budget-preserving moves (see `mixprec.search.moves`).

    `sample_relative` is called once per trial: it picks a parent among the completed feasible
    trials (the best one half of the time, otherwise one of the few best; in multi-objective mode
    any Pareto trial, at its own or another size), makes `candidates` children of it with
    1..`max_moves` moves each (single groups or whole blocks), and proposes the unseen child with the
    lowest estimated loss (with probability `exploit`; otherwise a random unseen child, so the
    estimate's blind spots are visited too). "Estimated" uses whichever of the plain and compressed
    estimates (`mixprec.search.solve.compressed`) ranks the trials measured so far most like their real KL.
    The random stream is seeded by (seed, trial number) and parents come from the study, so no state
    lives in the sampler. Before any trial has
    completed it defers to a seeded `RandomSampler` (and the objective repairs the budget).
    With `compact` (problems with very many groups) it proposes through `propose` only: the study's trials
    then hold no per-group parameters, so Optuna sees an empty search space.
    """

    def __init__(self, problem: Problem, limit_bits: int, seed: int = 0, max_moves: int = 3, top: int = 3,
                 multi_objective: bool = False, candidates: int = 24, exploit: float = 0.7,
                 correct: bool = True, compact: bool = False) -> None:
        self.problem = problem
        self.correct = correct
        self.candidates = candidates
        self.exploit = exploit
        self.limit_bits = limit_bits
        self.seed = seed
        self.max_moves = max_moves
        self.top = top
        self.multi_objective = multi_objective
        self._index = {name: i for i, name in enumerate(problem.names)}
        self._space = {} if compact else {problem.names[i]: IntDistribution(0, len(o) - 1)
                                          for i, o in enumerate(problem.options) if len(o) > 1}
        self._fallback = optuna.samplers.RandomSampler(seed)
        self._blocks = blocks(problem) if problem.layers and problem.kinds else []
        self._proxies = {1.0: problem, **{p: compressed(problem, p) for p in COMPRESSION_POWERS}}

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        child = self.propose(study, trial.number) if search_space else None
        if child is None:
            return {}  # a random proposal, repaired to the budget
        return {name: child[self._index[name]] for name in search_space}

    def propose(self, study: optuna.Study, number: int) -> list[int] | None:
        """Levels of trial `number`'s recipe, or None before any trial completed or when every child of five
        parents was evaluated already."""
        trials = study.get_trials(deepcopy=False)
        done = completed(trials)
        if not done:
            return None
        rng = random.Random(f"{self.seed}:{number}")
        seen = {tuple(t.user_attrs["levels"]) for t in trials if "levels" in t.user_attrs}  # pruned ones too
        for _ in range(5):  # another parent when every child of this one was evaluated already
            child = self._child(study, done, seen, rng)
            if child is not None:
                return child
        return None

    def _child(self, study: optuna.Study, done: list[FrozenTrial], seen: set[tuple[int, ...]],
               rng: random.Random) -> list[int] | None:
        """Mutate one parent `candidates` times; keep the unseen child the estimate likes best (mostly) or a
        random unseen one (sometimes), so real evaluations go to plausible recipes but the proxy's blind
        spots are still visited."""
        parent, limit = self._parent(study, done, rng)
        proxy = self._proxy(done)
        children: dict[tuple[int, ...], float] = {}
        for _ in range(self.candidates):
            child = mutate(self.problem, parent, limit, rng, rng.randint(1, self.max_moves), self.top, self._blocks)
            key = tuple(child)
            if key not in seen and key not in children:
                children[key] = sum(proxy.losses[i][k] for i, k in enumerate(child))
        if not children:
            return None
        ranked = sorted(children, key=lambda k: (children[k], k))
        return list(ranked[0] if rng.random() < self.exploit else rng.choice(ranked))

    def _proxy(self, done: list[FrozenTrial]) -> Problem:
        """The estimate whose ranking of the measured trials agrees best with their KL: plain, compressed, or
        corrected for the measured interaction (`mixprec.search.correct`, judged on leave-one-out predictions
        so its fit to the same trials gives it no unfair advantage)."""
        measured = [t.values[0] for t in done]
        best, best_score = self.problem, -2.0
        for power in sorted(self._proxies, reverse=True):
            proxy = self._proxies[power]
            predicted = [sum(proxy.losses[i][k] for i, k in enumerate(t.user_attrs["levels"])) for t in done]
            score = _concordance(predicted, measured)
            if score > best_score + 1e-12:
                best, best_score = proxy, score
        if self.correct and len(done) >= 3 and all(v > 0 for v in measured):
            correction = fit(self.problem, [t.user_attrs["levels"] for t in done], measured)
            if _concordance(list(correction.loo), measured) > best_score + 1e-12:
                best = correction.apply(self.problem)
        return best

    def _parent(self, study: optuna.Study, done: list[FrozenTrial], rng: random.Random) -> tuple[list[int], int]:
        if not self.multi_objective:
            ranked = sorted(done, key=lambda t: (t.value, t.number))
            pick = ranked[0] if rng.random() < 0.5 else rng.choice(ranked[: max(2, self.top + 1)])
            return list(pick.user_attrs["levels"]), self.limit_bits
        front = sorted(study.best_trials, key=lambda t: t.number) or done
        levels = list(rng.choice(front).user_attrs["levels"])
        if rng.random() < 0.5:
            return levels, min(total_cost(self.problem, levels), self.limit_bits)
        lowest = total_cost(self.problem, [0] * len(levels))
        limit = rng.randint(lowest, self.limit_bits)
        return fill(self.problem, lower_until_fits(self.problem, levels, limit), limit), limit

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)
