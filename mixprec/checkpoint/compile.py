"""Recipe + variants -> one Hugging Face-style checkpoint with really bit-packed integer weights.

The compiled folder holds exactly the codes the search measured: every quantized matrix is taken
from the variant of its group's bit width or option (`WORK/variants/<variant id>/`), never re-quantized,
so `mixprec.load` of the result reproduces the in-memory recipe model bit for bit.

Tensor layout (format version 2; version 1 is the same with one group size for all matrices). For a
quantized matrix stored in the source under key `K = <base>.weight` (per-expert keys such as
`model.layers.3.mlp.experts.5.gate_proj.weight`):

* `<base>.qweight`  uint8 [out, ceil(in*b/8)]: the codes as one little-endian bitstream per row
  (`mixprec.checkpoint.pack`); a row's last byte is zero-padded, the only size overhead (< 1 byte per row, none
  when in*b is a multiple of 8).
* `<base>.scales`   fp16 [out, ceil(in/group_size)]: one scale per group along the input dimension.
* `<base>.qzeros`   uint8 [out, ceil(groups*b/8)]: packed zero points, asymmetric recipes only.
  Dequantization is `scale * (code - zero)`, with `zero = 2^(b-1)` when symmetric.

When the source stores experts fused (`mlp.experts.gate_up_proj` [E, 2I, H]), `<base>` is the
variant unit name `<fused key>.e<E>.r<start>-<stop>` instead. Every other tensor (norms, routers,
embeddings, biases, MTP/extra keys the model class ignores) is copied byte for byte under its
source key; a fused source tensor is copied too unless all its matrices are quantized.

Each shard's `__metadata__` holds `format: pt`, the recipe YAML (`mixprec.formats.recipe`), its sha256, and
`mixprec.tensor_bits` (JSON: base -> bits for the quantized matrices in that shard). config.json
gains `quantization_config` (quant_method `mixprec`, `version` 2, bits per matrix, `group_sizes` and
`methods` per matrix (a recipe may pick them per group), the recipe's own group size, symmetry,
fingerprints), and `mixprec_compile.json` reports predicted vs actual bytes and shard hashes.
Everything is written into a temporary folder, re-read and verified, and only then moved into place.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixprec.checkpoint.pack import pack_codes
from mixprec.checkpoint.qformat import (
    FORMAT_VERSION,
    META_RECIPE,
    META_RECIPE_SHA,
    META_TENSOR_BITS,
    QUANT_METHOD,
    REPORT_FILE,
    CompileError,
    quantized_base,
    quantized_nbytes,
)
from mixprec.checkpoint.shards import INDEX_FILE, checkpoint_shards, plan_shards, shard_names, write_index
from mixprec.checkpoint.verify import CompilePlan, PlanEntry, build_report, verify_output
from mixprec.core.errors import FingerprintMismatchError, MixprecError
from mixprec.core.fileio import atomic_dir, atomic_write_json, read_json, sha256_text
from mixprec.core.progress import progress
from mixprec.core.version import __version__
from mixprec.formats.recipe import Recipe
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import ModelMap, WeightRef
from mixprec.model.tensorfile import TensorWriter
from mixprec.quant import QuantConfig, QuantizedWeight, quantizer_class
from mixprec.quant.ggml import GGMLQuantizer
from mixprec.quant.variants import Variant

__all__ = ["CompileError", "CompileConfig", "open_variants", "prepare_compile", "build_plan", "entry_tensors",
           "write_shards", "copy_side_files", "compile_recipe", "per_layer"]

log = logging.getLogger(__name__)

_DEFAULT_MAX_SHARD = 2 * 10**9
#: Bytes of each stored tensor of one [out, in] matrix at (bits, group size, symmetric), by tensor suffix.
SizeFn = Callable[[tuple[int, int], int, int, bool], dict[str, int]]
_WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack"}


@dataclass(frozen=True)
class CompileConfig:
    """How the checkpoint is written: shard size limit (bytes of tensor data), post-write verification, and
    `force`: replace an existing output folder even when it holds files an earlier compile did not write."""

    max_shard_bytes: int = _DEFAULT_MAX_SHARD
    verify: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.max_shard_bytes <= 0:
            raise CompileError(f"max_shard_bytes={self.max_shard_bytes} must be positive")


def _quantize_hint(checkpoint: Checkpoint, config: QuantConfig, work_dir: Path) -> str:
    flags = [f"--bits {config.bits}", f"--work {work_dir}", f"--method {config.method}"]
    if config.group_size != 64:
        flags.append(f"--group-size {config.group_size}")
    if not config.symmetric:
        flags.append("--asym")
    if config.clip_search:
        flags.append("--clip-search")
    return f"mixprec quantize {checkpoint.path} " + " ".join(flags)


def open_variants(recipe: Recipe, checkpoint: Checkpoint, work_dir: Path) -> dict[Any, Variant]:
    """The verified variant of every width or option label the recipe uses, made from this model with its
    settings, keyed as the recipe names it."""
    variants: dict[Any, Variant] = {}
    for option in sorted({o for o in recipe.groups.values() if o is not None}, key=str):
        config = recipe.quant_config(option)
        folder = Path(work_dir) / "variants" / config.variant_id
        hint = _quantize_hint(checkpoint, config, Path(work_dir))
        if not (folder / "manifest.json").exists():
            used = f"{option} bits" if isinstance(option, int) else f"option {option}"
            raise CompileError(f"the recipe uses {used} but variant folder {folder} is missing or "
                               f"unfinished; create it with `{hint}`")
        variant = Variant.open(folder, checkpoint.fingerprint)
        variant.verify()
        if variant.config != config:
            raise CompileError(f"{folder} was made with {variant.config} but the recipe needs {config}; "
                               f"re-create it with `{hint}`")
        variants[option] = variant
    return variants


def _assignments(recipe: Recipe, model_map: ModelMap) -> list[tuple[WeightRef, int | str]]:
    return [(ref, option) for name, option in recipe.groups.items() if option is not None
            for ref in model_map.group(name).weights]


def _natural(name: str) -> list[Any]:
    """Sort key that orders `layers.10` after `layers.9`, keeping each layer's tensors together."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _source_keys_replaced(model_map: ModelMap, assigned: list[tuple[WeightRef, int | str]]) -> set[str]:
    """Source keys all of whose matrices are quantized (a fused key may be only partly quantized)."""
    covered: dict[str, int] = defaultdict(int)
    for ref, _ in assigned:
        covered[ref.key] += 1
    total: dict[str, int] = defaultdict(int)
    for group in model_map.groups:
        for ref in group.weights:
            total[ref.key] += 1
    return {key for key, count in covered.items() if count == total[key]}


def build_plan(recipe: Recipe, model_map: ModelMap, checkpoint: Checkpoint, variants: dict[Any, Variant],
               max_shard_bytes: int, sizes: SizeFn = quantized_nbytes,
               suffixes: tuple[str, ...] = ("qweight", "scales", "qzeros")) -> CompilePlan:
    """What goes into which shard: each quantized matrix (stored as the tensors `sizes` describes, at its own
    option's width and group size) and every source tensor not wholly replaced, in natural name order.
    `sizes` and `suffixes` describe the compiled format's tensors per matrix (the mixprec format's by default)."""
    assigned = _assignments(recipe, model_map)
    entries = [_quantized_entry(ref, option, variants[option], sizes) for ref, option in assigned]
    replaced = _source_keys_replaced(model_map, assigned)
    headers = {name: info for h in checkpoint_shards(checkpoint.path) for name, info in h.tensors.items()}
    copied = [PlanEntry(key, info.nbytes) for key, info in headers.items() if key not in replaced]
    ordered = sorted(entries + copied, key=lambda e: _natural(e.name))
    predicted = sum(variants[o].manifest.units[ref.unit].storage_bits for ref, o in assigned)
    return CompilePlan(plan_shards([(e, e.nbytes) for e in ordered], max_shard_bytes),
                       {e.name: e.bits for e in entries}, predicted,  # type: ignore[misc]
                       sum(e.nbytes for e in copied), recipe.quantizer.group_size, recipe.quantizer.symmetric,
                       sorted(replaced), suffixes, {e.name: e.group_size for e in entries})  # type: ignore[misc]


def _quantized_entry(ref: WeightRef, option: int | str, variant: Variant, sizes: SizeFn) -> PlanEntry:
    """One quantized matrix of the plan, at its variant's width and group size."""
    if ref.unit not in variant.manifest.units:
        raise CompileError(f"{variant.path} has no matrix {ref.unit!r} (it quantized kinds "
                           f"{list(variant.manifest.kinds)}); re-run `mixprec quantize` with --kinds covering it")
    q = variant.config
    nbytes = sum(sizes(ref.shape, q.bits, q.group_size, q.symmetric).values())
    return PlanEntry(quantized_base(ref), nbytes, ref, q.bits, option, q.group_size)


def entry_tensors(entry: PlanEntry, checkpoint: Checkpoint, variants: dict[Any, Variant],
                  encode: Callable[[PlanEntry, QuantizedWeight], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One plan entry's tensors: a copied tensor as stored in the source, a quantized matrix read from its
    variant (shape checked) and written by `encode`, the part each compiled format does its own way."""
    if entry.ref is None:
        return {entry.name: checkpoint.read(entry.name).contiguous()}
    assert entry.bits is not None
    variant = variants[entry.variant_key]
    q = variant.quantized(entry.ref)
    if tuple(q.codes.shape) != entry.ref.shape:
        raise CompileError(f"{variant.path}: {entry.ref.unit} has shape {tuple(q.codes.shape)}, "
                           f"the model expects {entry.ref.shape}; re-create the variant")
    return encode(entry, q)


def _packed_tensors(entry: PlanEntry, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """mixprec's own format: bit-packed codes (and zero points) plus fp16 scales."""
    assert entry.bits is not None
    tensors = {f"{entry.name}.qweight": pack_codes(q.codes, entry.bits),
               f"{entry.name}.scales": q.scales.to(torch.float16).contiguous()}
    if q.zeros is not None:
        tensors[f"{entry.name}.qzeros"] = pack_codes(q.zeros, entry.bits)
    return tensors


_Produce = Callable[[PlanEntry], dict[str, torch.Tensor]]
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def per_layer(variants: dict[Any, Variant], produce: _Produce) -> _Produce:
    """`produce`, with the variants' files unmapped whenever the plan (in natural name order) reaches another
    layer: the pages read from a mapped variant count towards resident memory until it is closed, so without
    this a compile's peak RSS grew with the model (by the variants' size) although each matrix is freed."""
    current: list[str | None] = [None]

    def run(entry: PlanEntry) -> dict[str, torch.Tensor]:
        found = _LAYER.search(entry.name)
        layer = found.group(1) if found else None
        if layer != current[0]:
            for variant in variants.values():
                variant.close()
            current[0] = layer
        return produce(entry)

    return run


def _shard_metadata(recipe_yaml: str, entries: list[PlanEntry]) -> dict[str, str]:
    bits = {e.name: e.bits for e in entries if e.bits is not None}
    return {"format": "pt", META_RECIPE: recipe_yaml, META_RECIPE_SHA: sha256_text(recipe_yaml),
            "mixprec.format_version": str(FORMAT_VERSION), "mixprec.version": __version__,
            META_TENSOR_BITS: json.dumps(bits, sort_keys=True)}


def write_shards(folder: Path, plan: CompilePlan, recipe_yaml: str,
                 produce: Callable[[PlanEntry], dict[str, torch.Tensor]]) -> dict[str, str]:
    """Write every shard; returns the weight map (tensor name -> shard file)."""
    weight_map: dict[str, str] = {}
    total_bytes = 0
    names = shard_names(len(plan.shards))
    for name, entries in progress(list(zip(names, plan.shards, strict=True)), desc="compile", unit="shard"):
        # each entry's tensors go to disk as they are made: memory holds one matrix, not one shard
        with TensorWriter(folder / name, _shard_metadata(recipe_yaml, entries)) as writer:
            for entry in entries:
                for key, tensor in produce(entry).items():
                    writer.add(key, tensor)
                    total_bytes += tensor.numel() * tensor.element_size()
            weight_map.update(dict.fromkeys(writer.keys(), name))
    if len(names) > 1:
        write_index(folder, weight_map, total_bytes)
    return weight_map


def _quantization_config(recipe: Recipe, plan: CompilePlan, fingerprint: str) -> dict[str, Any]:
    q = recipe.quantizer
    return {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "mixprec_version": __version__,
            "method": q.method, "group_size": q.group_size, "symmetric": q.symmetric, "scale_dtype": "float16",
            "packing": "uint8 little-endian bitstream per row", "default": None,
            "granularity": recipe.granularity.value, "groups": dict(recipe.groups),
            "bits": dict(sorted(plan.bits_map.items(), key=lambda kv: _natural(kv[0]))),
            "group_sizes": dict(sorted(plan.group_sizes.items(), key=lambda kv: _natural(kv[0]))),
            "methods": {e.name: recipe.quant_config(e.option).method for e in sorted(
                plan.entries(), key=lambda e: _natural(e.name)) if e.option is not None},
            "recipe_sha256": sha256_text(recipe.to_yaml()), "model_fingerprint": fingerprint}


def _is_side_file(path: Path, weight_files: set[Path]) -> bool:
    """Tokenizer, generation config, token splits, README...: top-level files that are not weights."""
    if not path.is_file() or path in weight_files or path.name in ("config.json", REPORT_FILE, INDEX_FILE):
        return False
    if path.suffix == ".safetensors":
        return not path.name.startswith("model")  # e.g. the bundled model's evaluation.safetensors tokens
    return path.suffix not in _WEIGHT_SUFFIXES


def copy_side_files(source: Path, folder: Path, weight_files: set[Path]) -> list[str]:
    """Copy the source's tokenizer, generation config and other non-weight files; returns their names."""
    copied = []
    for path in sorted(source.iterdir()):
        if _is_side_file(path, weight_files):
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    return copied


def _foreign_entries(out: Path) -> list[str]:
    """Entries of an existing output folder that no compile wrote there (user notes, results folders)."""
    try:
        report = read_json(out / REPORT_FILE)
    except MixprecError:
        report = None
    if not isinstance(report, dict):
        return sorted(p.name for p in out.iterdir())
    ours = {REPORT_FILE, "config.json", INDEX_FILE, *(report.get("shards") or {}), *(report.get("side_files") or [])}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in ours or p.is_dir())


def _check_target(out_dir: Path, checkpoint: Checkpoint, work_dir: Path, force: bool = False) -> None:
    """The output folder may be replaced whole only when it is new, empty, or an earlier compile output that
    holds nothing else (or with `force`): replacing it deletes everything inside."""
    out = out_dir.resolve()
    for protected in (checkpoint.path, Path(work_dir).resolve()):
        if out == protected or protected.is_relative_to(out):
            raise CompileError(f"output folder {out_dir} would replace {protected}; choose a new folder")
    if out.exists() and not out.is_dir():
        raise CompileError(f"--out {out_dir} is an existing file; give a folder path for the checkpoint")
    if force or not out.exists() or not any(out.iterdir()):
        return
    if not (out / REPORT_FILE).exists():
        raise CompileError(f"output folder {out_dir} exists and is not a mixprec compile output; "
                           "remove it or choose another folder (it would be replaced)")
    foreign = _foreign_entries(out)
    if foreign:
        raise CompileError(f"output folder {out_dir} is an earlier compile output but also holds {foreign[:5]}, "
                           "which replacing it would delete; move them out, choose another --out, or pass --force")


def prepare_compile(recipe: Recipe, checkpoint: Checkpoint, work_dir: Path, out_dir: Path,
                    force: bool = False) -> tuple[ModelMap, dict[Any, Variant]]:
    """Validate everything a compile needs before writing anything: an unquantized source, a safe output
    folder, a recipe for this model, and every variant present and intact. Shared by all compiled formats."""
    if issubclass(quantizer_class(recipe.quantizer.method), GGMLQuantizer):
        raise CompileError(f"recipe quantizer {recipe.quantizer.method!r} holds ggml blocks, which only a GGUF "
                           "can hold; compile it with --format gguf")
    if "quantization_config" in checkpoint.config:
        raise CompileError(f"{checkpoint.path}/config.json already has a quantization_config; compile from the "
                           "unquantized model the variants were made from")
    _check_target(out_dir, checkpoint, work_dir, force)
    model_map = checkpoint.model_map(recipe.granularity)
    try:
        recipe.check_model(model_map, checkpoint.fingerprint)
    except FingerprintMismatchError as exc:
        raise FingerprintMismatchError(f"{exc} (if {checkpoint.path} is the model the recipe was made for, one "
                                       "of its files has changed or is corrupt)") from exc
    return model_map, open_variants(recipe, checkpoint, work_dir)


def compile_recipe(recipe: Recipe, checkpoint: Checkpoint, work_dir: str | Path, out_dir: str | Path,
                   config: CompileConfig | None = None) -> dict[str, Any]:
    """Compile `recipe` over the variants in `work_dir` into `out_dir`; returns the compile report.

    All inputs are validated (recipe fits the model, fingerprint, every variant present and intact)
    before anything is written; any failure leaves no output folder.
    """
    config = config or CompileConfig()
    started = time.perf_counter()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    model_map, variants = prepare_compile(recipe, checkpoint, work_dir, out_dir, config.force)
    plan = build_plan(recipe, model_map, checkpoint, variants, config.max_shard_bytes)
    recipe_yaml = recipe.to_yaml()
    with atomic_dir(out_dir) as tmp:
        write_shards(tmp, plan, recipe_yaml,
                     per_layer(variants, lambda e: entry_tensors(e, checkpoint, variants, _packed_tensors)))
        source_config = dict(checkpoint.config)
        source_config["quantization_config"] = _quantization_config(recipe, plan, checkpoint.fingerprint)
        (tmp / "config.json").write_text(json.dumps(source_config, indent=2, sort_keys=True) + "\n")
        side_files = copy_side_files(checkpoint.path, tmp, set(checkpoint.files))
        if config.verify:
            verify_output(tmp, plan, recipe_yaml)
        report = build_report(tmp, recipe, checkpoint, variants, plan, side_files, config.max_shard_bytes,
                              time.perf_counter() - started)
        atomic_write_json(tmp / REPORT_FILE, report)
    log.info("compiled %s: %d shard(s), %.1f%% of predicted quantized bytes", out_dir, len(plan.shards),
             100 * report["actual"]["quantized_bytes"] / max(report["predicted"]["quantized_bytes"], 1e-9))
    return report
