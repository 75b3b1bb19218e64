"""The equivalent-uniform-bpw yardstick and the interaction correction of the additive estimate.

Both are pure numerics, checked against values computed by hand and against synthetic ground truth.

Run: .venv/bin/python -m pytest tests/test_gain.py -q
"""

from __future__ import annotations

import math
import random

import pytest

from mixprec.core.errors import MixprecError
from mixprec.model.arch import GroupKind
from mixprec.search.correct import design, fit
from mixprec.search.gain import UniformCurve, UniformPoint
from mixprec.search.moves import total_cost
from mixprec.search.solve import Problem, pareto_front


def curve() -> UniformCurve:
    # 3-bit g32 (3.5 bpw) is beaten by 4-bit g128 at 4.125? no: it is cheaper, so both stay; 3-bit g64 at 3.25
    # with a higher KL than 3-bit g128 (3.125) is dominated and must be dropped.
    return UniformCurve.from_points([
        UniformPoint("2b-g64", 2.25, 1e-1), UniformPoint("3b-g128", 3.125, 1e-2), UniformPoint("3b-g64", 3.25, 2e-2),
        UniformPoint("3b-g32", 3.5, 5e-3), UniformPoint("4b-g128", 4.125, 2e-3), UniformPoint("4b-g64", 4.25, 1e-3)])


def test_envelope_keeps_the_best_uniform_at_each_size() -> None:
    labels = [p.label for p in curve().points]
    assert labels == ["2b-g64", "3b-g128", "3b-g32", "4b-g128", "4b-g64"]
    kls = [p.kl for p in curve().points]
    assert kls == sorted(kls, reverse=True)


def test_gain_interpolates_log_kl_between_envelope_points() -> None:
    c = curve()
    for p in c.points:  # a recipe as good as a uniform point is worth exactly that point's bpw
        assert c.equivalent_bpw(p.kl)[0] == pytest.approx(p.bpw)
    geometric_mid = math.sqrt(1e-2 * 5e-3)  # halfway in log-KL between 3b-g128 and 3b-g32
    assert c.equivalent_bpw(geometric_mid) == (pytest.approx((3.125 + 3.5) / 2), False)
    gain = c.gain(2e-3, 3.0)
    assert gain.gain == pytest.approx(1.125) and not gain.extrapolated
    assert c.gain(1e-2, 3.5).gain == pytest.approx(-0.375), "a recipe worse than uniform at its size loses bits"
    assert c.kl_at(3.3125) == pytest.approx(geometric_mid)


def test_outside_the_curve_is_extrapolated_and_flagged() -> None:
    c = curve()
    below, outside = c.equivalent_bpw(5e-4)
    assert outside and below == pytest.approx(4.25 + 0.125)  # one more halving along the last segment
    assert c.equivalent_bpw(0.5)[1]
    with pytest.raises(MixprecError, match="positive"):
        c.equivalent_bpw(0.0)
    with pytest.raises(MixprecError, match="two uniform"):
        UniformCurve.from_points([UniformPoint("a", 3.0, 1e-2)])


def _problem(rng: random.Random, groups: int = 10) -> Problem:
    kinds = [GroupKind.ATTENTION, GroupKind.ROUTED_EXPERTS, GroupKind.SHARED_EXPERTS]
    names, options, costs, losses, ks = [], [], [], [], []
    for g in range(groups):
        size = rng.choice([64, 128, 256])
        widths = (2, 3, 4, 6)
        base = rng.uniform(0.2, 2.0)
        names.append(f"g{g}")
        options.append(widths)
        costs.append(tuple(size * w for w in widths))
        losses.append(tuple(base * 4.0 ** -(w - 2) for w in widths))
        ks.append(kinds[g % 3])
    return Problem(tuple(names), tuple(options), tuple(costs), tuple(losses), tuple(ks), tuple(range(groups)),
                   tuple(c[0] // 2 for c in costs))


def test_correction_recovers_class_weights_and_moves_the_dp_to_the_true_optimum() -> None:
    """Ground truth: composed KL = Σ w(kind, width) · drop-one loss with attention at 2 bits 3x worse than
    drop-one says and 2-bit experts half as bad. Fitted on random recipes, the correction recovers the
    weights and the DP on the corrected estimate finds the true optimum where the plain DP does not."""
    rng = random.Random(5)
    problem = _problem(rng)
    truth = {("attention", 2): 3.0, ("routed_experts", 2): 0.5}
    x_labels = [(k.value, w) for k in (GroupKind.ATTENTION, GroupKind.ROUTED_EXPERTS, GroupKind.SHARED_EXPERTS)
                for w in (2, 3, 4, 6)]

    def true_kl(picks: list[int]) -> float:
        return sum(problem.losses[i][k] * truth.get((problem.kinds[i].value, problem.options[i][k]), 1.0)
                   for i, k in enumerate(picks))

    recipes = [[rng.randrange(4) for _ in problem.names] for _ in range(40)]
    correction = fit(problem, recipes, [true_kl(r) for r in recipes])
    assert correction.helps and correction.loo_error < 0.05 < correction.plain_error
    weights = dict(zip(correction.labels, correction.weights, strict=True))
    assert weights[("attention", 2)] == pytest.approx(3.0, rel=0.1)
    assert weights[("routed_experts", 2)] == pytest.approx(0.5, rel=0.1)
    limit = total_cost(problem, [1] * len(problem.names))
    truth_problem = Problem(problem.names, problem.options, problem.costs,
                            tuple(tuple(v * truth.get((problem.kinds[i].value, problem.options[i][k]), 1.0)
                                        for k, v in enumerate(row)) for i, row in enumerate(problem.losses)),
                            problem.kinds, problem.layers, problem.params)
    best = pareto_front(truth_problem).best_under(limit)
    corrected = pareto_front(correction.apply(problem)).best_under(limit)
    plain = pareto_front(problem).best_under(limit)
    regret = truth_problem.loss(corrected.assignment) / best.loss - 1
    plain_regret = truth_problem.loss(plain.assignment) / best.loss - 1
    print(f"regret: corrected {regret:.4f}, plain {plain_regret:.4f}")
    assert regret < 0.02 and plain_regret > 5 * regret, "the correction should remove most of the plain regret"
    assert set(x_labels) >= set(correction.labels)
    assert design(problem, recipes[:1])[0].sum() == pytest.approx(problem.loss(problem.assignment(recipes[0])))


def test_correction_stays_at_the_plain_estimate_when_it_is_already_right() -> None:
    rng = random.Random(6)
    problem = _problem(rng)
    recipes = [[rng.randrange(4) for _ in problem.names] for _ in range(12)]
    correction = fit(problem, recipes, [problem.loss(problem.assignment(r)) for r in recipes])
    assert not correction.helps
    assert all(w == pytest.approx(1.0, abs=1e-6) for w in correction.weights)
    with pytest.raises(MixprecError, match="three"):
        fit(problem, recipes[:2], [1.0, 2.0])
