"""The report's tables as formatted DataFrames (strings), shared by the HTML page and the Markdown summary.

Means are printed with their standard error (`1.45e-04 ± 1.6e-05`) because differences between
recipes at equal size are often within a few SE; a table without them invites over-reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mixprec.report.collect import WorkFolder

__all__ = ["fmt_kl", "overview", "variants_table", "budgets_table", "comparison_table", "bits_table",
           "sensitivity_table", "compiled_table", "studies_table"]


def fmt_kl(value: Any, se: Any = None) -> str:
    """`1.45e-04 ± 1.6e-05`, or `—` when the value is missing."""
    if value is None or pd.isna(value):
        return "—"
    return f"{float(value):.3e}" if se is None or pd.isna(se) else f"{float(value):.3e} ± {float(se):.1e}"


def overview(data: WorkFolder) -> list[tuple[str, str]]:
    """(label, value) lines describing the model, the measurement and its data."""
    lines = [("model", data.model_name), ("work folder", str(data.work_dir)),
             ("budgets", ", ".join(data.budgets()) or "none (no recipes yet)"),
             ("groups", str(len(data.groups())))]
    m = data.measurement
    if m is not None:
        s, d = m.summary.settings, m.summary.data
        floor = ((m.summary.noise_floor or {}).get("bf16_compute") or {})
        lines += [("model fingerprint", m.summary.model.fingerprint[:16] + "…"),
                  ("measurement", f"{m.folder.name}: mode {s.mode}, granularity {s.granularity}, "
                                  f"bits {', '.join(str(b) for b in s.measured_bits)}, {s.quant.method} "
                                  f"g{s.quant.group_size}"),
                  ("measurement data", f"{d.source} ({d.split}): {d.num_windows} windows x {d.seq_len} "
                                       f"tokens, sha256 {d.sha256[:12]}…"),
                  ("bf16 noise floor", fmt_kl(floor.get("kl_mean"), floor.get("kl_se")))]
    if data.missing_studies:
        lines.append(("studies not found", "; ".join(data.missing_studies)))
    return lines


def variants_table(data: WorkFolder) -> pd.DataFrame:
    frame = data.variants.drop(columns=["path"]).copy()
    frame["bpw"] = frame["bpw"].map(lambda v: f"{v:.4f}")
    return frame


def budgets_table(data: WorkFolder) -> pd.DataFrame:
    """One line per recipe: its budget, achieved size and KL at each stage of the pipeline."""
    rows = []
    for run in data.recipes:
        kl, study = run.recipe.kl, run.study
        rows.append({"recipe file": run.label, "budget": run.budget,
                     "achieved bpw": "—" if run.bpw is None else f"{run.bpw:.4f}",
                     "predicted KL": fmt_kl(kl.get("predicted")),
                     "calibration KL": fmt_kl(kl.get("calibration"), kl.get("calibration_se")),
                     "held-out KL": fmt_kl(kl.get("evaluation"), kl.get("evaluation_se")),
                     "solver": str(run.recipe.provenance.get("solver", "—")),
                     "study": study[0] if study else "—"})
    return pd.DataFrame(rows)


def comparison_table(data: WorkFolder) -> pd.DataFrame:
    """Every compared recipe at every budget, with the paired difference to mixprec."""
    frame = data.comparison()
    if frame.empty:
        return frame
    return pd.DataFrame({
        "budget": frame["budget"], "recipe": frame["recipe"], "solver": frame["solver"],
        "bpw": frame["bpw"].map(lambda v: f"{v:.4f}"), "predicted": frame["predicted"].map(fmt_kl),
        "calibration KL": [fmt_kl(v, s) for v, s in zip(frame["calibration_kl"], frame["calibration_se"],
                                                         strict=True)],
        "held-out KL": [fmt_kl(v, s) for v, s in zip(frame["evaluation_kl"], frame["evaluation_se"], strict=True)],
        "paired diff vs mixprec": [f"{d:+.2e} ± {s:.1e}" for d, s in zip(frame["diff_vs_mixprec"],
                                                                        frame["diff_se"], strict=True)],
        "ratio vs mixprec": frame["ratio_vs_mixprec"].map(lambda v: f"{v:.2f}x"),
    })


def bits_table(data: WorkFolder) -> pd.DataFrame:
    """Every group with its kind, size and bit width in each recipe (`fp` = original precision kept)."""
    table = data.bit_table().reset_index()
    groups = data.groups().set_index("group")
    table.insert(3, "params", [groups.loc[g, "params"] for g in table["group"]])
    for run in data.recipes:
        table[run.label] = ["fp" if pd.isna(v) else str(int(v)) for v in table[run.label]]
    return table.drop(columns=["part"]).astype({"layer": "string"}).fillna("—")


def sensitivity_table(data: WorkFolder) -> pd.DataFrame:
    """The measurement as groups x bits, each cell the table's KL (drop) or ΔKL (raise) ± SE."""
    m = data.measurement
    if m is None:
        return pd.DataFrame()
    cells: dict[str, dict[str, str]] = {}
    for row in m.table.itertuples():
        cells.setdefault(str(row.group), {})[f"{int(row.bits)}-bit"] = fmt_kl(row.dkl, row.dkl_se)
    frame = pd.DataFrame.from_dict(cells, orient="index")
    frame = frame[sorted(frame.columns, key=lambda c: int(c.split("-")[0]))]
    return frame.rename_axis("group").reset_index()


def compiled_table(data: WorkFolder) -> pd.DataFrame:
    """`mixprec demo`'s compiled checkpoints re-evaluated on their own, next to what the search measured."""
    rows = []
    for row in (data.demo or {}).get("budgets", []):
        ours = (row.get("comparison") or {}).get("mixprec") or {}
        mib, top1, ppl = row.get("compiled_mib"), row.get("compiled_same_top1"), row.get("compiled_ppl_ratio")
        rows.append({"budget": f"{row.get('budget'):g}bpw", "compiled": Path(str(row.get("compiled", "—"))).name,
                     "size MiB": "—" if mib is None else f"{mib:.2f}",
                     "compiled KL (held-out)": fmt_kl(row.get("compiled_kl"), row.get("compiled_kl_se")),
                     "search's held-out KL": fmt_kl(ours.get("evaluation_kl"), ours.get("evaluation_se")),
                     "same top-1": "—" if top1 is None else f"{100 * top1:.2f}%",
                     "PPL ratio": "—" if ppl is None else f"{ppl:.4f}"})
    return pd.DataFrame(rows)


def studies_table(data: WorkFolder) -> pd.DataFrame:
    rows = []
    for study in data.studies:
        trials = study.trials
        best = trials.loc[trials["kl"].idxmin()] if not trials.empty else None
        rows.append({"study": study.name, "storage": study.storage, "completed trials": len(trials),
                     "best calibration KL": "—" if best is None else fmt_kl(best["kl"], best["kl_se"]),
                     "best trial": "—" if best is None else f"#{int(best['number'])} ({best['seed']})",
                     "artifacts": str(study.artifact_dir) if study.artifact_dir else "—"})
    return pd.DataFrame(rows)
