"""The files a measurement leaves behind, and how later stages read them back.

WORK/measure/<mode>-<granularity>/
    journal.log        Optuna journal: the jobs and every finished row (the source of truth)
    table.csv          tidy table, one row per group x bits (see `TABLE_COLUMNS`)
    summary.json       model fingerprint, variants and their sha256, data identity, engine dtype/device,
                       noise floors, the raise-mode base KL, timing and counts
    measurement.json   the same table in exllamav3's measurement.json shape (`mixprec.measure.exl3`)

`load_measurement(folder)` gives the search and report stages a pandas table plus the summary.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from safetensors import safe_open

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_write_json, atomic_write_text, read_json
from mixprec.core.version import __version__
from mixprec.measure.exl3 import exl3_measurement
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import Group, ModelMap

if TYPE_CHECKING:
    from mixprec.measure.config import MeasureConfig
    from mixprec.measure.store import Job, JobStore
    from mixprec.model.data import TokenWindows
    from mixprec.quant.variants import Variant

__all__ = ["MEASUREMENT_SCHEMA_VERSION", "TABLE_COLUMNS", "Measurement", "is_finished", "load_measurement",
           "write_outputs", "reference_bits", "format_table"]

MEASUREMENT_SCHEMA_VERSION = 1

TABLE_COLUMNS = [
    "group", "kind", "layer", "params", "mode", "base_bits", "bits", "variant_id", "storage_bits", "delta_bits",
    "bpw", "kl_mean", "kl_se", "kl_median", "kl_p90", "kl_p99", "same_top1", "same_top1_se", "rms_dp",
    "ln_ppl_ratio", "dkl", "dkl_se", "n_tokens", "n_sequences", "seconds", "device", "worker",
]


@dataclass
class Measurement:
    """A finished measurement: the tidy table and the summary that identifies what it was made from."""

    folder: Path
    table: pd.DataFrame
    summary: dict[str, Any]

    def pivot(self, value: str = "dkl") -> pd.DataFrame:
        """Groups as rows (in model order), bit widths as columns."""
        order = list(dict.fromkeys(self.table["group"]))
        return self.table.pivot(index="group", columns="bits", values=value).loc[order]


def is_finished(folder: str | Path) -> bool:
    """Whether `folder` holds a finished table: table.csv and summary.json are written only when every job is done."""
    return (Path(folder) / "summary.json").exists() and (Path(folder) / "table.csv").exists()


def load_measurement(folder: str | Path) -> Measurement:
    """Read table.csv and summary.json written by `mixprec measure`."""
    folder = Path(folder)
    summary_path, table_path = folder / "summary.json", folder / "table.csv"
    if not is_finished(folder):
        raise MixprecError(f"{folder} holds no finished measurement (table.csv and summary.json are written when "
                           "every job is done); run or resume `mixprec measure`")
    summary = read_json(summary_path)
    if summary.get("schema_version") != MEASUREMENT_SCHEMA_VERSION:
        raise MixprecError(f"{summary_path}: schema_version {summary.get('schema_version')} is not "
                           f"{MEASUREMENT_SCHEMA_VERSION}; re-run `mixprec measure` with this mixprec version")
    table = pd.read_csv(table_path)
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise MixprecError(f"{table_path} lacks columns {missing}; re-run `mixprec measure`")
    return Measurement(folder, table, summary)


def reference_bits(checkpoint: Checkpoint, group: Group) -> int:
    """Bits the group's matrices take in the checkpoint as stored (e.g. 16 per weight for bf16)."""
    bits = 0
    for ref in group.weights:
        with safe_open(checkpoint.key_to_file[ref.key], "pt") as handle:
            dtype = handle.get_slice(ref.key).get_dtype()
        width = re.search(r"\d+", dtype)
        bits += ref.numel * (int(width.group()) if width else 16)
    return bits


def _table(jobs: Sequence[Job], rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame([rows[job.key] for job in jobs])
    return frame[TABLE_COLUMNS + [c for c in frame.columns if c not in TABLE_COLUMNS]]


def _groups(model_map: ModelMap, jobs: Sequence[Job]) -> dict[str, Any]:
    names = dict.fromkeys(job.group for job in jobs)
    groups = {}
    for name in names:
        group = model_map.group(name)
        modules = dict.fromkeys(ref.key.removesuffix(".weight") for ref in group.weights)
        groups[name] = {"kind": group.kind.value, "layer": group.layer, "params": group.num_params,
                        "modules": list(modules)}
    return groups


def _finite(value: Any) -> Any:
    """JSON has no NaN: statistics that do not exist (an empty confidence bucket) become null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _timing(table: pd.DataFrame, store: JobStore) -> dict[str, Any]:
    engine = store.get_attr("engine") or {}
    return {"reference_s": engine.get("reference_s"), "jobs_s_total": float(table["seconds"].sum()),
            "job_s_median": float(table["seconds"].median()), "workers": int(table["worker"].nunique())}


def write_outputs(config: MeasureConfig, checkpoint: Checkpoint, model_map: ModelMap, variants: Mapping[int, Variant],
                  windows: TokenWindows, jobs: Sequence[Job], rows: Mapping[str, Mapping[str, Any]],
                  store: JobStore) -> None:
    """Write table.csv, summary.json and measurement.json atomically into the measurement folder."""
    table = _table(jobs, rows)
    folder = config.folder
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)  # full precision: later stages difference these numbers
    atomic_write_text(folder / "table.csv", buffer.getvalue())
    summary = {
        "schema_version": MEASUREMENT_SCHEMA_VERSION,
        "mixprec_version": __version__,
        "model": {"path": str(checkpoint.path), "fingerprint": checkpoint.fingerprint,
                  "model_type": checkpoint.model_type,
                  "architecture": (checkpoint.config.get("architectures") or [checkpoint.model_type])[0]},
        "variants": {str(bits): {"variant_id": v.manifest["variant_id"], "path": str(v.path),
                                 "sha256": v.manifest["file_sha256"], "bpw": v.manifest["totals"]["bpw"]}
                     for bits, v in sorted(variants.items())},
        "data": windows.spec.to_dict(),
        "settings": {**config.settings(), "bits": list(config.bits), "measured_bits": list(config.measured_bits),
                     "num_windows": config.num_windows, "seq_len": config.seq_len},
        "engine": store.get_attr("engine"),
        "noise_floor": store.get_attr("noise_floor"),
        "base": store.get_attr("base"),
        "timing": _timing(table, store),
        "counts": {"groups": len(dict.fromkeys(j.group for j in jobs)), "bits": len(config.measured_bits),
                   "rows": len(table), "trials": store.counts()},
        "storage": config.storage or str(folder / "journal.log"),
        "groups": _groups(model_map, jobs),
    }
    summary = _finite(summary)
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_json(folder / "measurement.json", exl3_measurement(table, summary))


def _cell(value: float, se: float) -> str:
    return f"{value:.2e}±{se:.0e}" if pd.notna(se) else f"{value:.2e}"


def format_table(measurement: Measurement) -> list[dict[str, object]]:
    """Rows for printing: one per group, one column per bit width with the mode's dkl ± se."""
    table = measurement.table
    printed = []
    for name in dict.fromkeys(table["group"]):
        part = table[table["group"] == name]
        row: dict[str, object] = {"group": name}
        for _, cell in part.sort_values("bits").iterrows():
            row[f"{int(cell['bits'])}b"] = _cell(float(cell["dkl"]), float(cell["dkl_se"]))
        printed.append(row)
    return printed
