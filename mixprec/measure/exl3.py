"""Export a measurement in exllamav3's `measurement.json` shape (FIELD.md §5.1), and read one back.

exllamav3's optimizer expects raise-one numbers: a base (its lowest variant), alternatives in
increasing bpw, and per group one candidate per alternative with `dkld` (KL change relative to
the base, negative = better) and `dbits` (storage bits added). A raise-mode table maps onto that
directly. A drop-mode table has no base run; it is exported with the lowest measured width as the
base and `dkld = KL(group at b) - KL(group at base)`, each measured from the unquantized model: an
additive approximation, flagged in the extra `mixprec` key (exllamav3 ignores unknown keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from mixprec.measure.summary import MeasurementSummary

__all__ = ["exl3_measurement"]


def _bpw(table: pd.DataFrame, bits: int) -> float:
    cells = table[table["bits"] == bits]
    return float(cells["storage_bits"].sum() / cells["params"].sum())


def exl3_measurement(table: pd.DataFrame, summary: MeasurementSummary) -> dict[str, Any]:
    """The exllamav3 `measurement.json` object for a mixprec table and its summary."""
    mode = str(table["mode"].iloc[0])
    variants = summary.variants
    measured = sorted(int(b) for b in table["bits"].unique())
    if mode == "raise":
        base_bits, alts = int(table["base_bits"].iloc[0]), measured
        base_kld = float(summary.base_kl)  # type: ignore[arg-type]  # a raise-mode table always has a base
    else:
        base_bits, alts = measured[0], measured[1:]
        base_kld = None
    groups = []
    for idx, name in enumerate(dict.fromkeys(table["group"])):
        cells = table[table["group"] == name].set_index("bits")
        base_kl = 0.0 if mode == "raise" else float(cells.loc[base_bits, "kl_mean"])
        base_storage = (float(cells.iloc[0]["storage_bits"] - cells.iloc[0]["delta_bits"]) if mode == "raise"
                        else float(cells.loc[base_bits, "storage_bits"]))
        candidates = [{"dkld": float(cells.loc[b, "dkl"]) - base_kl if mode == "raise"
                       else float(cells.loc[b, "kl_mean"]) - base_kl,
                       "dbits": int(float(cells.loc[b, "storage_bits"]) - base_storage)} for b in alts]
        groups.append({"idx": idx, "layers": list(summary.groups[name].modules), "candidates": candidates})
    base_bpw = (_bpw(table, measured[0]) if mode == "drop" else
                float((table.drop_duplicates("group")["storage_bits"] - table.drop_duplicates("group")["delta_bits"]
                       ).sum() / table.drop_duplicates("group")["params"].sum()))
    result: dict[str, Any] = {
        "base": {"dir": variants[str(base_bits)].path, "bpw": base_bpw},
        "alts": [{"dir": variants[str(b)].path, "bpw": _bpw(table, b)} for b in alts],
        "groups": groups,
        "base_kld": base_kld if base_kld is not None else 0.0,
        "arch_string": summary.model.architecture,
        "mixprec": {"mode": mode, "base_bits": base_bits, "model_fingerprint": summary.model.fingerprint,
                    "note": "raise-one numbers" if mode == "raise" else
                    "drop-one numbers re-based on the lowest width (additive approximation); base_kld unknown"},
    }
    return result
