"""The additive estimate's inputs: per group and width, the loss a measurement table attributes to it.

Kept apart from the stage inputs (`mixprec.search.inputs`) because the report draws the same Pareto
front from a table without running any part of the search stage.
"""

from __future__ import annotations

from mixprec.measure.table import Measurement
from mixprec.search.solve import isotonic_decreasing

__all__ = ["measurement_losses"]


def measurement_losses(measurement: Measurement) -> dict[str, dict[int, float]]:
    """Per group and width, the additive loss: drop-mode KL, or raise-mode ΔKL (0 at the base width).

    Each group's row is made non-increasing in bits by a 1/SE²-weighted isotonic fit: KL that
    rises with more bits is noise at the floor (FIELD.md §9.4).
    """
    frame = measurement.table.sort_values(["group", "bits"])
    losses: dict[str, dict[int, float]] = {}
    for group, rows in frame.groupby("group", sort=False):
        bits = [int(b) for b in rows["bits"]]
        values = [float(v) for v in rows["dkl"]]
        weights = [1.0 / max(float(se), 1e-12) ** 2 if se == se else 1.0 for se in rows["dkl_se"]]
        if str(rows["mode"].iloc[0]) == "raise":
            base = int(rows["base_bits"].iloc[0])
            bits, values, weights = [base, *bits], [0.0, *values], [max(weights) * 10, *weights]
        losses[str(group)] = dict(zip(bits, isotonic_decreasing(values, weights), strict=True))
    return losses
