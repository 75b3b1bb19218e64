"""The plan of a compiled checkpoint, its verification after writing, and the predicted-vs-actual size report.

Verification re-reads what was written instead of trusting the writer: every shard header is parsed
again, the index must match the shards, and the per-matrix bit map recorded in the shard metadata must
equal the recipe's. The report compares the exact size the variants' manifests predict (codes at b
bits, fp16 scales, zero points) with the bytes really stored; they differ only by the per-row byte
padding of the packed codes (documented in `mixprec.checkpoint.pack`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixprec.checkpoint.qformat import (
    FORMAT_VERSION,
    META_RECIPE,
    META_RECIPE_SHA,
    META_TENSOR_BITS,
    REPORT_FILE,
    CompileError,
    quantized_nbytes,
)
from mixprec.checkpoint.shards import ShardHeader, TensorInfo, checkpoint_shards
from mixprec.core.fileio import read_json, sha256_file, sha256_text
from mixprec.core.version import __version__
from mixprec.model.modelmap import WeightRef

if TYPE_CHECKING:
    from mixprec.formats.recipe import Recipe
    from mixprec.model.loading import Checkpoint
    from mixprec.quant.variants import Variant

__all__ = ["PlanEntry", "CompilePlan", "verify_output", "build_report"]

_EXPECTED_DTYPE = {"qweight": "U8", "scales": "F16", "qzeros": "U8"}


@dataclass(frozen=True)
class PlanEntry:
    """One unit written to a shard: a quantized matrix (`ref` and `bits` set) or one copied source tensor.

    `option` is the recipe's choice for the matrix (a width, or an option label, which keys its variant) and
    `group_size` its group size (None: the plan's)."""

    name: str
    nbytes: int
    ref: WeightRef | None = None
    bits: int | None = None
    option: int | str | None = None
    group_size: int | None = None

    @property
    def variant_key(self) -> int | str | None:
        """The key of the matrix's variant: its option, or its width for plans made without one."""
        return self.bits if self.option is None else self.option


@dataclass
class CompilePlan:
    """What goes into which shard, plus the bookkeeping the report needs."""

    shards: list[list[PlanEntry]]
    bits_map: dict[str, int]
    predicted_bits: int
    copied_bytes: int
    group_size: int
    symmetric: bool
    skipped_keys: list[str] = field(default_factory=list)
    #: Names of the tensors one quantized matrix is stored as (`<base>.<suffix>`), per compiled format.
    suffixes: tuple[str, ...] = ("qweight", "scales", "qzeros")
    #: Per matrix base, its group size (every matrix; format version 2).
    group_sizes: dict[str, int] = field(default_factory=dict)

    def entries(self) -> list[PlanEntry]:
        return [entry for shard in self.shards for entry in shard]


def _fail(folder: Path, what: str) -> CompileError:
    return CompileError(f"verification of the compiled folder {folder} failed: {what}; this is a bug in "
                        "mixprec compile, please report it with the recipe")


def _check_shard_metadata(folder: Path, header: ShardHeader, recipe_yaml: str) -> dict[str, int]:
    meta = header.metadata
    if meta.get("format") != "pt" or meta.get(META_RECIPE) != recipe_yaml:
        raise _fail(folder, f"{header.path.name} lacks format=pt or the embedded recipe")
    if meta.get(META_RECIPE_SHA) != sha256_text(recipe_yaml):
        raise _fail(folder, f"{header.path.name}: {META_RECIPE_SHA} does not match the recipe")
    return {str(k): int(v) for k, v in json.loads(meta.get(META_TENSOR_BITS, "{}")).items()}


def _check_entry(folder: Path, entry: PlanEntry, plan: CompilePlan, tensors: dict[str, TensorInfo]) -> None:
    if entry.ref is None:
        info = tensors.get(entry.name)
        if info is None or info.nbytes != entry.nbytes:
            raise _fail(folder, f"copied tensor {entry.name} is missing or has the wrong size")
        return
    assert entry.bits is not None
    rows = entry.ref.shape[0]
    sizes = quantized_nbytes(entry.ref.shape, entry.bits, plan.group_sizes.get(entry.name, plan.group_size),
                             plan.symmetric)
    for suffix, nbytes in sizes.items():
        info = tensors.get(f"{entry.name}.{suffix}")
        if info is None or info.nbytes != nbytes or info.dtype != _EXPECTED_DTYPE[suffix] or info.shape[0] != rows:
            raise _fail(folder, f"{entry.name}.{suffix} is missing or is not {_EXPECTED_DTYPE[suffix]} "
                                f"with {rows} rows and {nbytes} bytes at {entry.bits} bits")


def verify_output(folder: Path, plan: CompilePlan, recipe_yaml: str) -> None:
    """Re-read every header of the written folder and check it against the plan and the recipe."""
    headers = checkpoint_shards(folder)  # also validates the index against the shards
    tensors: dict[str, TensorInfo] = {}
    recorded: dict[str, int] = {}
    for header in headers:
        recorded.update(_check_shard_metadata(folder, header, recipe_yaml))
        tensors.update(header.tensors)
    if recorded != plan.bits_map:
        diff = sorted(set(recorded.items()) ^ set(plan.bits_map.items()))[:3]
        raise _fail(folder, f"the per-matrix bits in the shard metadata differ from the recipe, e.g. {diff}")
    config_bits = read_json(folder / "config.json")["quantization_config"]["bits"]
    if config_bits != plan.bits_map:
        raise _fail(folder, "config.json quantization_config.bits differs from the recipe")
    entries = plan.entries()
    for entry in entries:
        _check_entry(folder, entry, plan, tensors)
    per_matrix = 2 if plan.symmetric else 3  # qweight + scales (+ qzeros)
    expected = sum(per_matrix if e.ref is not None else 1 for e in entries)
    if len(tensors) != expected:
        raise _fail(folder, f"the shards hold {len(tensors)} tensors, the plan has {expected}")


def _quantized_bytes(headers: list[ShardHeader], bits_map: dict[str, int],
                     suffixes: tuple[str, ...]) -> dict[str, int]:
    sizes = dict.fromkeys(suffixes, 0)
    for header in headers:
        for name, info in header.tensors.items():
            base, _, suffix = name.rpartition(".")
            if base in bits_map and suffix in sizes:
                sizes[suffix] += info.nbytes
    return sizes


def _per_bits(plan: CompilePlan, variants: dict[Any, Variant]) -> dict[str, dict[str, int]]:
    """Matrices, weights and predicted bits per option (a width, or an option label with `--options`)."""
    table: dict[str, dict[str, int]] = {}
    widths: dict[str, int] = {}
    for entry in plan.entries():
        if entry.ref is not None and entry.bits is not None:
            key = str(entry.variant_key)
            widths[key] = entry.bits
            row = table.setdefault(key, {"matrices": 0, "params": 0, "predicted_bits": 0})
            row["matrices"] += 1
            row["params"] += entry.ref.numel
            row["predicted_bits"] += variants[entry.variant_key].manifest.units[entry.ref.unit].storage_bits
    return dict(sorted(table.items(), key=lambda kv: (widths[kv[0]], kv[0])))


def build_report(folder: Path, recipe: Recipe, checkpoint: Checkpoint, variants: dict[Any, Variant],
                 plan: CompilePlan, side_files: list[str], max_shard_bytes: int, elapsed_s: float) -> dict[str, Any]:
    """Sizes (predicted vs actual), shards with hashes, inputs with fingerprints; written as mixprec_compile.json."""
    headers = checkpoint_shards(folder)
    quantized = _quantized_bytes(headers, plan.bits_map, plan.suffixes)
    actual_q = sum(quantized.values())
    predicted_q = plan.predicted_bits / 8
    params = sum(e.ref.numel for e in plan.entries() if e.ref is not None)
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != REPORT_FILE)
    report = {
        "schema_version": FORMAT_VERSION, "kind": "mixprec.compile_report", "mixprec_version": __version__,
        "recipe_sha256": sha256_text(recipe.to_yaml()),
        "model": {"path": str(checkpoint.path), "model_type": checkpoint.model_type,
                  "fingerprint": checkpoint.fingerprint},
        "variants": {str(b): {"id": v.manifest.variant_id, "path": str(v.path),
                              "file_sha256": v.manifest.file_sha256}
                     for b, v in sorted(variants.items(), key=lambda kv: str(kv[0]))},
        "quantizer": asdict(recipe.quantizer), "bits": _per_bits(plan, variants),
        "predicted": {"quantized_bytes": predicted_q, "copied_bytes": plan.copied_bytes,
                      "tensor_bytes": predicted_q + plan.copied_bytes,
                      "bpw": plan.predicted_bits / params if params else None},
        "actual": {"quantized_bytes": actual_q, **{f"{k}_bytes": v for k, v in quantized.items()},
                   "copied_bytes": plan.copied_bytes, "tensor_bytes": sum(h.data_bytes for h in headers),
                   "folder_bytes": folder_bytes, "bpw": 8 * actual_q / params if params else None},
        "ratio_quantized": actual_q / predicted_q if predicted_q else None,
        "padding_bytes": actual_q - predicted_q,
        "shards": {h.path.name: {"bytes": h.file_bytes, "tensors": len(h.tensors), "sha256": sha256_file(h.path)}
                   for h in headers},
        "max_shard_bytes": max_shard_bytes, "replaced_source_keys": len(plan.skipped_keys),
        "side_files": side_files, "elapsed_s": round(elapsed_s, 3),
    }
    return report
