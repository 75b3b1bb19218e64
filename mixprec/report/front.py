"""The additive estimate's exact Pareto front, rebuilt from a measurement table alone.

The report draws the front the search started from (every cost-optimal recipe of the sensitivity
table, `mixprec.search.solve.pareto_front`) next to the held-out KL the chosen recipes reached, so a reader
sees how far the composed model departs from the sum of single-group KLs. The costs come from the
table's own `storage_bits` (exact bits per group and width, copied from the variants' manifests),
and the losses from the same isotonic cleaning the search uses, so no model or variant is loaded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mixprec.measure.table import Measurement
from mixprec.model.arch import GroupKind
from mixprec.search.costs import CostTable, GroupCost
from mixprec.search.estimate import measurement_losses
from mixprec.search.solve import Problem, pareto_front

__all__ = ["cost_table", "additive_front", "base_kl"]


def cost_table(measurement: Measurement) -> CostTable:
    """Exact storage bits per group and width; raise mode adds the base width (storage_bits - delta_bits)."""
    groups = []
    for name, rows in measurement.table.groupby("group", sort=False):
        bits = {int(r.bits): int(r.storage_bits) for r in rows.itertuples()}
        if str(rows["mode"].iloc[0]) == "raise":
            first = rows.iloc[0]
            bits[int(first["base_bits"])] = int(first["storage_bits"] - first["delta_bits"])
        layer = rows["layer"].iloc[0]
        groups.append(GroupCost(str(name), GroupKind(str(rows["kind"].iloc[0])),
                                None if pd.isna(layer) else int(layer), int(rows["params"].iloc[0]),
                                dict(sorted(bits.items()))))
    return CostTable(tuple(groups))


def additive_front(measurement: Measurement, max_points: int = 400) -> pd.DataFrame:
    """bpw and predicted KL of every point of the DP front (thinned to about `max_points` for plotting)."""
    table = cost_table(measurement)
    options = {g.name: tuple(g.bits) for g in table.groups}
    front = pareto_front(Problem.build(table, options, measurement_losses(measurement)))
    keep = np.unique(np.linspace(0, len(front) - 1, num=min(len(front), max_points)).round().astype(int))
    predicted = front.losses[keep] + base_kl(measurement)
    return pd.DataFrame({"bpw": front.costs[keep] / table.params, "predicted": predicted})


def base_kl(measurement: Measurement) -> float:
    """What the additive losses are relative to: 0 in drop mode, the all-at-base KL in raise mode.

    Note: raise-mode losses are ΔKL from the base model (negative when a group is raised), so the
    composed model's KL is predicted as base KL + ΣΔ; without the base the prediction is not a KL.
    """
    if str(measurement.table["mode"].iloc[0]) != "raise":
        return 0.0
    base = measurement.summary.base_kl
    return float(base) if base is not None else 0.0
