"""Split mode: a per-expert sensitivity table without measuring each expert on its own.

Giving each routed expert its own width pays: on the bundled model a search over per-expert groups found
recipes with 0.7x the calibration KL of the fine groups' at 3–4 bpw, because experts differ by 1000x in
how much their 2-bit version hurts. Measuring every expert alone costs experts-per-layer times the fine
table, though (15,000 groups per width for a 256-expert, 58-layer model). Split mode measures the fine
table (all experts of one layer and projection swapped together: the drop-mode table of
`--granularity fine`, measured first if missing) and divides each of its routed-expert losses among the
experts in proportion to each expert's output-error proxy at that width,

    share_e(b) = Σ_i w_ei ‖ΔW_e(b)[:, i]‖² / Σ_e' (same),     w = router-weighted Σ g² x² (`mixprec.quant.importance`)

so the experts' losses add up to the measured one and only one extra forward pass over the calibration
windows is spent. Attention and shared-expert rows are the fine table's own. The rows are written as a
table of mode `split` (WORK/measure/split-expert[-quantizer]/) that the search reads like a measured one;
every composed recipe the study tries is still measured for real.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import sha256_text
from mixprec.core.version import __version__
from mixprec.measure.config import MeasureConfig
from mixprec.measure.inputs import measure_variants
from mixprec.measure.summary import MeasurementSummary
from mixprec.measure.table import (
    TABLE_COLUMNS,
    Measurement,
    MeasurementRow,
    group_modules,
    load_measurement,
    measured_settings,
    reference_bits,
    write_table,
)
from mixprec.model.arch import GroupKind
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import Group, ModelMap
from mixprec.model.streaming import open_model
from mixprec.quant.importance import ExpertImportance, collect_expert_importance, load_importance, save_importance
from mixprec.quant.variants import Variant, read_source

__all__ = ["fine_config", "check_split", "expert_shares", "split_rows", "run_split"]

log = logging.getLogger(__name__)

#: share[fine group][expert group][bits]
Shares = dict[str, dict[str, dict[int, float]]]


def fine_config(config: MeasureConfig) -> MeasureConfig:
    """The drop-mode fine table a split table is derived from (same quantizer, widths, data and kinds)."""
    return replace(config, mode="drop", granularity="fine")


def check_split(config: MeasureConfig) -> None:
    """Refuse, before the fine table is measured, a model without routed experts to split among."""
    checkpoint = Checkpoint.open(config.model)
    if not checkpoint.model_map(config.granularity).select([GroupKind.ROUTED_EXPERTS]):
        raise MixprecError(f"{checkpoint.path} has no routed experts to split the fine table among; use --mode drop")


def _expert_group_of(expert_map: ModelMap) -> dict[str, str]:
    """Matrix unit -> the per-expert group holding it."""
    return {ref.unit: g.name for g in expert_map.groups if g.kind is GroupKind.ROUTED_EXPERTS for ref in g.weights}


def _proxy(delta: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ_i w_i ‖ΔW[:, i]‖²: the output error energy of ΔW under diagonal input second moments `weights`."""
    return float(delta.double().square().sum(dim=0) @ weights.to(torch.float64))


def _fine_proxies(group: Group, checkpoint: Checkpoint, variants: Mapping[int, Variant],
                  importance: Mapping[str, ExpertImportance], owner: Mapping[str, str]) -> dict[str, dict[int, float]]:
    """Per-expert-group proxy at every width for the matrices of one fine routed-experts group."""
    proxies: dict[str, dict[int, float]] = {}
    source: dict[str, torch.Tensor] = {}
    for ref in group.weights:
        if ref.key not in source:
            source = {ref.key: read_source(checkpoint, ref.key)}  # one source tensor held at a time
        original = ref.slice_disk(source[ref.key])
        weights = importance[ref.param.rpartition(".")[0]].weights_for(ref.param, int(ref.expert))  # type: ignore[arg-type]
        row = proxies.setdefault(owner[ref.unit], {})
        for bits, variant in variants.items():
            row[bits] = row.get(bits, 0.0) + _proxy(variant.dequantized(ref) - original, weights)
    return proxies


def expert_shares(fine_map: ModelMap, expert_map: ModelMap, checkpoint: Checkpoint, variants: Mapping[int, Variant],
                  importance: Iterable[ExpertImportance]) -> Shares:
    """For every fine routed-experts group, each expert group's share of its loss at every width (sums to 1)."""
    by_module = {imp.module: imp for imp in importance}
    owner = _expert_group_of(expert_map)
    shares: Shares = {}
    for group in fine_map.select([GroupKind.ROUTED_EXPERTS]):
        proxies = _fine_proxies(group, checkpoint, variants, by_module, owner)
        shares[group.name] = {}
        for name, row in proxies.items():
            shares[group.name][name] = {}
            for bits, value in row.items():
                total = sum(r[bits] for r in proxies.values())
                # an expert no token reaches has no error: all experts then share equally (never 0/0)
                shares[group.name][name][bits] = value / total if total > 0 else 1.0 / len(proxies)
    return shares


def _row(template: pd.Series, group: Group, bits: int, kl: float, se: float, storage: int, base: int) -> MeasurementRow:
    """A split row: the statistics only a measurement has (median, top-1 agreement, ...) are NaN, not made up."""
    nan = float("nan")
    return MeasurementRow(
        group=group.name, kind=group.kind.value, layer=group.layer, params=group.num_params, mode="split",
        base_bits=round(base / group.num_params), bits=bits, variant_id=str(template["variant_id"]),
        storage_bits=storage, delta_bits=storage - base, bpw=storage / group.num_params, kl_mean=kl, kl_se=se,
        kl_median=nan, kl_p90=nan, kl_p99=nan, same_top1=nan, same_top1_se=nan, rms_dp=nan, ln_ppl_ratio=nan,
        dkl=kl, dkl_se=se, n_tokens=int(template["n_tokens"]), n_sequences=int(template["n_sequences"]),
        seconds=0.0, device="split", worker="split")


def _fine_cell(fine: Measurement, group: str, bits: int) -> pd.Series:
    """The fine table's row of `group` at `bits` (a table measured at other widths is named, not indexed past)."""
    table = fine.table
    found = table[(table["group"] == group) & (table["bits"] == bits)]
    if found.empty:
        raise MixprecError(f"{fine.folder / 'table.csv'} has no row for {group} at {bits} bits; re-run "
                           "`mixprec measure --granularity fine` with the same --bits")
    return found.iloc[0]


def _expert_rows(fine: Measurement, group: Group, checkpoint: Checkpoint, variants: Mapping[int, Variant],
                 shares: Shares) -> list[dict[str, object]]:
    """One expert group's rows: Σ over the fine groups holding its matrices of measured KL x its share."""
    base = reference_bits(checkpoint, group)
    rows = []
    for bits, variant in sorted(variants.items()):
        cells = [(_fine_cell(fine, name, bits), row[group.name][bits]) for name, row in shares.items()
                 if group.name in row]
        kl = sum(float(cell["kl_mean"]) * share for cell, share in cells)
        se = math.sqrt(sum((float(cell["kl_se"]) * share) ** 2 for cell, share in cells))
        rows.append(_row(cells[0][0], group, bits, kl, se, variant.storage_bits(group), base).to_dict())
    return rows


def split_rows(fine: Measurement, expert_map: ModelMap, checkpoint: Checkpoint, variants: Mapping[int, Variant],
               shares: Shares) -> pd.DataFrame:
    """The split table in model order: the fine rows of every group that is not a routed expert, and per-expert
    rows whose KL is the fine experts groups' measured KL times the expert's share (SE scaled alike)."""
    rows: list[dict[str, object]] = []
    for group in expert_map.groups:
        if group.kind is GroupKind.ROUTED_EXPERTS:
            rows += _expert_rows(fine, group, checkpoint, variants, shares)
        else:
            found = fine.table[(fine.table["group"] == group.name) & fine.table["bits"].isin(list(variants))]
            rows += [{**r, "mode": "split"} for r in found.to_dict("records")]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _importance(config: MeasureConfig, checkpoint: Checkpoint, fine_map: ModelMap) -> list[ExpertImportance]:
    """Router-weighted input second moments on the measurement's own calibration windows, computed once per
    model and windows (`WORK/measure/importance-<key>.safetensors`) and shared by every family's split."""
    windows = load_windows(checkpoint.path, config.split, WindowConfig(config.seq_len, config.num_windows),
                           list(config.data_files) or None)
    key = sha256_text(json.dumps([checkpoint.fingerprint, windows.spec.sha256, config.engine.batch_windows]))
    path = Path(config.work) / "measure" / f"importance-{key[:16]}.safetensors"
    if path.exists():
        return load_importance(path)
    model = open_model(checkpoint, config.streaming, torch.device("cpu"), config.max_memory)
    found = list(collect_expert_importance(model, fine_map, windows.tokens, config.engine.batch_windows))
    save_importance(found, path)
    return found


def run_split(config: MeasureConfig) -> Path:
    """Split the finished fine table's expert rows per expert and write the split table (`run_measure`
    measures the fine table first when it is missing)."""
    started = time.perf_counter()
    fine = load_measurement(fine_config(config).folder)
    checkpoint = Checkpoint.open(config.model)
    fine_map, expert_map = checkpoint.model_map("fine"), checkpoint.model_map(config.granularity)
    variants = {b: v for b, v in measure_variants(config, checkpoint).items() if b in config.measured_bits}
    shares = expert_shares(fine_map, expert_map, checkpoint, variants, _importance(config, checkpoint, fine_map))
    table = split_rows(fine, expert_map, checkpoint, variants, shares)
    summary = MeasurementSummary(
        mixprec_version=__version__, model=fine.summary.model, variants=fine.summary.variants,
        data=fine.summary.data, settings=measured_settings(config), engine=None,
        noise_floor=fine.summary.noise_floor, base=None,
        timing={"split_s": round(time.perf_counter() - started, 3)},
        counts={"groups": int(table["group"].nunique()), "bits": len(config.measured_bits), "rows": len(table),
                "split_from": str(fine.folder)},
        storage=str(fine.summary.storage), groups=group_modules(expert_map, list(table["group"])))
    config.folder.mkdir(parents=True, exist_ok=True)
    write_table(config.folder, table, summary)
    return config.folder
