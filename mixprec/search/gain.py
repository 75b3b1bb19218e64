"""The "equivalent uniform bpw gain" yardstick: how many bits per weight a recipe is worth.

Take the held-out KL of a recipe, find the bpw at which the uniform curve of the *same quantizer
family* reaches that KL, and subtract the recipe's bpw. +1.0 means the recipe at 3.0 bpw is as good
as uniform at 4.0 bpw. The curve is the lower envelope of every uniform option measured (several
group sizes at one width are several points; at each size the best one counts), and KL is
interpolated linearly in log-KL between neighbouring envelope points, because uniform KL falls
roughly geometrically with bits (FIELD.md §9.5: 2 -> 3 -> 4 bits divide it by ~10 and ~4).

Outside the curve the answer is only a bound: a recipe better than the best uniform point is
extrapolated along the last envelope segment and flagged `extrapolated`, so a report can say ">=".
Pure functions of numbers: no torch, no Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mixprec.core.errors import MixprecError

__all__ = ["UniformPoint", "UniformCurve", "Gain"]


@dataclass(frozen=True)
class UniformPoint:
    """One uniform option: its label (e.g. uniform-3b-g64), exact bpw and measured KL."""

    label: str
    bpw: float
    kl: float

    def __post_init__(self) -> None:
        if not (self.bpw > 0 and self.kl > 0 and math.isfinite(self.kl)):
            raise MixprecError(f"uniform point {self.label!r}: bpw {self.bpw} and KL {self.kl} must be positive "
                               "and finite")


@dataclass(frozen=True)
class Gain:
    """A recipe's equivalent uniform bpw and its gain; `extrapolated` when outside the measured curve."""

    equivalent_bpw: float
    gain: float
    extrapolated: bool

    def to_dict(self) -> dict[str, float | bool]:
        return {"equivalent_bpw": round(self.equivalent_bpw, 4), "gain": round(self.gain, 4),
                "extrapolated": self.extrapolated}


@dataclass(frozen=True)
class UniformCurve:
    """The lower envelope of uniform options: bpw ascending, KL strictly descending."""

    points: tuple[UniformPoint, ...]

    @classmethod
    def from_points(cls, points: Sequence[UniformPoint]) -> UniformCurve:
        """Keep only options no cheaper-or-equal option beats (the best uniform at each size)."""
        if len(points) < 2:
            raise MixprecError("a uniform curve needs at least two uniform options (two widths)")
        envelope: list[UniformPoint] = []
        for p in sorted(points, key=lambda p: (p.bpw, p.kl)):
            if not envelope or p.kl < envelope[-1].kl:
                envelope.append(p)
        if len(envelope) < 2:
            raise MixprecError("the uniform options do not improve with more bits; the curve is degenerate")
        return cls(tuple(envelope))

    def kl_at(self, bpw: float) -> float:
        """Log-linear interpolation of the envelope at `bpw` (extrapolated along the end segments)."""
        a, b = self._segment([p.bpw for p in self.points], bpw)
        t = (bpw - a.bpw) / (b.bpw - a.bpw)
        return math.exp(math.log(a.kl) + t * (math.log(b.kl) - math.log(a.kl)))

    def equivalent_bpw(self, kl: float) -> tuple[float, bool]:
        """The bpw at which the envelope reaches `kl`, and whether that lies outside the measured points."""
        if not kl > 0:
            raise MixprecError(f"KL {kl} must be positive to place it on the uniform curve")
        a, b = self._segment([-math.log(p.kl) for p in self.points], -math.log(kl))
        t = (math.log(a.kl) - math.log(kl)) / (math.log(a.kl) - math.log(b.kl))
        outside = not (self.points[-1].kl <= kl <= self.points[0].kl)
        return a.bpw + t * (b.bpw - a.bpw), outside

    def gain(self, kl: float, bpw: float) -> Gain:
        """Equivalent uniform bpw minus the recipe's own bpw."""
        equivalent, outside = self.equivalent_bpw(kl)
        return Gain(equivalent, equivalent - bpw, outside)

    def _segment(self, keys: Sequence[float], value: float) -> tuple[UniformPoint, UniformPoint]:
        """The envelope segment whose ascending `keys` range holds `value` (the end segment when outside)."""
        for i in range(1, len(keys) - 1):
            if value < keys[i]:
                return self.points[i - 1], self.points[i]
        return self.points[-2], self.points[-1]

    def to_dict(self) -> list[dict[str, float | str]]:
        return [{"label": p.label, "bpw": round(p.bpw, 4), "kl": p.kl} for p in self.points]
