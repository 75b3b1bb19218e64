"""Correcting the additive estimate with the interaction measured on composed recipes.

The DP solves the sum of drop-one KLs, but groups interact: on the bundled model composed KL over
that sum ranges 0.68-1.03 across recipes (README, Quantizers), and the error is not uniform: it
depends on which kinds of groups sit at which widths (two 2-bit attention blocks compound, while a
2-bit expert among 4-bit neighbours costs less than alone). Every trial of the study is a measured
composed recipe, i.e. one equation

    measured_t ≈ Σ_c w_c · x_tc,   x_tc = Σ of the drop-one losses of recipe t's groups in class c,

with one class per (group kind, width). `fit` finds the weights by ridge regression on *relative*
errors (each trial counts equally whatever its KL), shrunk towards 1 (= the plain estimate), with
the shrinkage picked by leave-one-out error. `Correction.apply` rescales the problem's losses so the
DP (and the sampler's moves) solve the corrected estimate instead. With few trials the weights stay
at 1 and nothing changes; the correction only moves what the measurements support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixprec.core.errors import MixprecError
from mixprec.search.solve import Problem

__all__ = ["RIDGE_GRID", "Correction", "design", "fit", "loo_predictions"]

#: Shrinkage strengths tried by `fit` (picked by leave-one-out relative error).
RIDGE_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
_W_MIN, _W_MAX = 0.1, 10.0


def _classes(problem: Problem) -> tuple[list[tuple[str, object]], list[list[int]]]:
    """Class labels (kind, width) and the class of each (group, option) cell."""
    labels: dict[tuple[str, object], int] = {}
    cells = []
    for i, options in enumerate(problem.options):
        kind = problem.kinds[i].value if problem.kinds else "group"
        cells.append([labels.setdefault((kind, o), len(labels)) for o in options])
    return list(labels), cells


def design(problem: Problem, picks: Sequence[Sequence[int]]) -> np.ndarray:
    """Per recipe (option indices), the drop-one loss summed per class: the regression's inputs."""
    labels, cells = _classes(problem)
    x = np.zeros((len(picks), len(labels)))
    for t, recipe in enumerate(picks):
        for i, k in enumerate(recipe):
            x[t, cells[i][k]] += problem.losses[i][k]
    return x


def _solve(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_w Σ_t ((x_t·w − y_t)/y_t)² + ridge·Σ_c (w_c − 1)², clipped to a sane range."""
    rows = x / y[:, None]
    a = np.vstack([rows, np.sqrt(ridge) * np.eye(x.shape[1])])
    b = np.concatenate([np.ones(len(y)), np.sqrt(ridge) * np.ones(x.shape[1])])
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    return np.clip(w, _W_MIN, _W_MAX)


def loo_predictions(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Each recipe's KL predicted by the weights fitted on all the others."""
    out = np.empty(len(y))
    for t in range(len(y)):
        keep = np.arange(len(y)) != t
        out[t] = float(x[t] @ _solve(x[keep], y[keep], ridge))
    return out


@dataclass(frozen=True)
class Correction:
    """Weights per (kind, width) class, the shrinkage chosen, and leave-one-out errors against the plain sum."""

    labels: tuple[tuple[str, object], ...]
    weights: tuple[float, ...]
    ridge: float
    loo_error: float
    plain_error: float
    loo: tuple[float, ...] = ()

    @property
    def helps(self) -> bool:
        """The corrected estimate predicts unseen recipes better than the plain sum (leave-one-out)."""
        return self.loo_error < self.plain_error

    def apply(self, problem: Problem) -> Problem:
        """The problem with every loss multiplied by its class weight."""
        _, cells = _classes(problem)
        losses = tuple(tuple(v * self.weights[c] for v, c in zip(row, cell, strict=True))
                       for row, cell in zip(problem.losses, cells, strict=True))
        return Problem(problem.names, problem.options, problem.costs, losses, problem.kinds, problem.layers,
                       problem.params)

    def to_dict(self) -> dict[str, object]:
        return {"ridge": self.ridge, "loo_rel_error": self.loo_error, "plain_rel_error": self.plain_error,
                "weights": {f"{k}@{b}": round(w, 4) for (k, b), w in zip(self.labels, self.weights, strict=True)}}


def _rel_error(predicted: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared relative error."""
    return float(np.sqrt(np.mean(((predicted - y) / y) ** 2)))


def fit(problem: Problem, picks: Sequence[Sequence[int]], measured: Sequence[float],
        ridges: Sequence[float] = RIDGE_GRID) -> Correction:
    """Class weights from measured composed recipes, shrinkage chosen by leave-one-out relative error."""
    y = np.asarray(measured, dtype=np.float64)
    if len(y) < 3 or len(picks) != len(y) or not np.all(y > 0):
        raise MixprecError("a correction needs at least three measured recipes with positive KL")
    x = design(problem, picks)
    scored = []
    for ridge in ridges:
        loo = loo_predictions(x, y, ridge)
        scored.append((_rel_error(loo, y), ridge, loo))
    error, ridge, loo = min(scored, key=lambda s: (s[0], -s[1]))
    labels, _ = _classes(problem)
    weights = _solve(x, y, ridge)
    return Correction(tuple(labels), tuple(float(w) for w in weights), ridge, error,
                      _rel_error(x.sum(axis=1), y), tuple(float(v) for v in loo))
