"""The files a measurement leaves behind, and how later stages read them back.

WORK/measure/<mode>-<granularity>/
    journal.log        Optuna journal: the jobs and every finished row (the source of truth)
    table.csv          tidy table, one `MeasurementRow` per group x bits (its fields are `TABLE_COLUMNS`)
    summary.json       `MeasurementSummary` (`mixprec.measure.summary`): model fingerprint, variants and their
                       sha256, data identity, settings, engine dtype/device, noise floors, the raise-mode
                       base KL, timing and counts
    measurement.json   the same table in exllamav3's measurement.json shape (`mixprec.measure.exl3`)

`load_measurement(folder)` gives the search and report stages a pandas table plus the typed summary.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from safetensors import safe_open

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_write_json, atomic_write_text, read_json
from mixprec.core.records import record_fields
from mixprec.core.version import __version__
from mixprec.measure.exl3 import exl3_measurement
from mixprec.measure.summary import REMEASURE, GroupModules, MeasuredSettings, MeasurementSummary, VariantUse
from mixprec.model.loading import Checkpoint, ModelRecord
from mixprec.model.modelmap import Group, ModelMap

if TYPE_CHECKING:
    from mixprec.measure.config import MeasureConfig
    from mixprec.measure.store import Job, JobStore
    from mixprec.model.data import TokenWindows
    from mixprec.quant.variants import Variant

__all__ = ["TABLE_COLUMNS", "MeasurementRow", "Measurement", "is_finished", "load_measurement", "write_outputs",
           "reference_bits", "format_table", "write_table", "group_modules", "measured_settings"]

@dataclass(frozen=True)
class MeasurementRow:
    """One measured job (a group at one width): a row of table.csv and a finished trial in the job store.

    `dkl` is the loss the search adds up: drop-mode KL, or raise-mode KL change against the base.
    """

    group: str
    kind: str
    layer: int | None
    params: int
    mode: str
    base_bits: int
    bits: int
    variant_id: str
    storage_bits: int
    delta_bits: int
    bpw: float
    kl_mean: float
    kl_se: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    same_top1: float
    same_top1_se: float
    rms_dp: float
    ln_ppl_ratio: float
    dkl: float
    dkl_se: float
    n_tokens: int
    n_sequences: int
    seconds: float
    device: str
    worker: str

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MeasurementRow:
        return cls(**record_fields(data, cls, where, MixprecError, REMEASURE))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: table.csv's columns, in order: the fields of `MeasurementRow`.
TABLE_COLUMNS = [f.name for f in fields(MeasurementRow)]


@dataclass
class Measurement:
    """A finished measurement: the tidy table and the summary that identifies what it was made from."""

    folder: Path
    table: pd.DataFrame
    summary: MeasurementSummary

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
    summary = MeasurementSummary.from_dict(read_json(summary_path), str(summary_path))
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


def _table(jobs: Sequence[Job], rows: Mapping[str, Mapping[str, Any]], where: str) -> pd.DataFrame:
    typed = [MeasurementRow.from_dict(dict(rows[job.key]), f"{where}: job {job.key}") for job in jobs]
    return pd.DataFrame([row.to_dict() for row in typed], columns=TABLE_COLUMNS)


def group_modules(model_map: ModelMap, names: Sequence[str]) -> dict[str, GroupModules]:
    """summary.json `groups`: each named group's kind, layer, size and checkpoint modules."""
    groups = {}
    for name in dict.fromkeys(names):
        group = model_map.group(name)
        modules = dict.fromkeys(ref.key.removesuffix(".weight") for ref in group.weights)
        groups[name] = GroupModules(group.kind.value, group.layer, group.num_params, tuple(modules))
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


def measured_settings(config: MeasureConfig) -> MeasuredSettings:
    return MeasuredSettings(config.mode, config.granularity, tuple(config.kinds), config.quant,
                            config.base_bits if config.mode == "raise" else None, tuple(config.bits),
                            config.measured_bits, config.num_windows, config.seq_len)


def _summary(config: MeasureConfig, checkpoint: Checkpoint, model_map: ModelMap, variants: Mapping[int, Variant],
             windows: TokenWindows, jobs: Sequence[Job], table: pd.DataFrame, store: JobStore) -> MeasurementSummary:
    return MeasurementSummary(
        mixprec_version=__version__, model=ModelRecord.of(checkpoint, with_architecture=True),
        variants={str(bits): VariantUse(v.manifest.variant_id, str(v.path), v.manifest.file_sha256,
                                        v.manifest.totals.bpw) for bits, v in sorted(variants.items())},
        data=windows.spec, settings=measured_settings(config), engine=_finite(store.get_attr("engine")),
        noise_floor=_finite(store.get_attr("noise_floor")), base=_finite(store.get_attr("base")),
        timing=_finite(_timing(table, store)),
        counts={"groups": len(dict.fromkeys(j.group for j in jobs)), "bits": len(config.measured_bits),
                "rows": len(table), "trials": store.counts()},
        storage=config.storage or str(config.folder / "journal.log"),
        groups=group_modules(model_map, [job.group for job in jobs]))


def write_outputs(config: MeasureConfig, checkpoint: Checkpoint, model_map: ModelMap, variants: Mapping[int, Variant],
                  windows: TokenWindows, jobs: Sequence[Job], rows: Mapping[str, Mapping[str, Any]],
                  store: JobStore) -> None:
    """Write table.csv, summary.json and measurement.json atomically into the measurement folder."""
    folder = config.folder
    table = _table(jobs, rows, str(folder / "journal.log") if config.storage is None else config.storage)
    write_table(folder, table, _summary(config, checkpoint, model_map, variants, windows, jobs, table, store))


def write_table(folder: Path, table: pd.DataFrame, summary: MeasurementSummary) -> None:
    """The three files of a finished table, each written atomically (a measured table and a split one alike)."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)  # full precision: later stages difference these numbers
    atomic_write_text(folder / "table.csv", buffer.getvalue())
    atomic_write_json(folder / "summary.json", _finite(summary.to_dict()))
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
