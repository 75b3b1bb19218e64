"""Recipe + variants -> vLLM's compressed-tensors `pack-quantized` checkpoint (`--format compressed-tensors`).

The codes are the variants' own, as for the mixprec format (`mixprec.checkpoint.compile`): only the
container changes. For every quantized module `M` (checkpoint key `M.weight`, out x in, b bits, group G):

* `M.weight_packed`     int32 [out, ceil(in*b/32)]: each row's codes as one dense little-endian bitstream,
  code j in bits [j*b, (j+1)*b) counting from the least significant bit of word 0, so at 3/5/6/7 bits a
  code may straddle two words. This is compressed-tensors 0.20's `pack_to_int32` layout (what vLLM sizes
  its parameters for); versions up to 0.17 packed `32 // b` codes per word and cannot read it. The bit
  order equals the mixprec format's, so the words are mixprec's packed bytes padded to whole words.
  The stored field is the unsigned code 0..2^b-1; compressed-tensors reads it as q = code - 2^(b-1).
* `M.weight_scale`      fp16 [out, in/G], the variant's scales unchanged.
* `M.weight_shape`      int64 [2] = [out, in].
* `M.weight_zero_point` int32 [ceil(out*b/32), in/G], asymmetric only: the zero points z packed along the
  output dimension (compressed-tensors' `packed_dim=0`), stored as z (its signed z - 2^(b-1), offset).

compressed-tensors and vLLM dequantize `(q - zp) * scale`, which is `(code - z) * scale` with z = 2^(b-1)
when symmetric: mixprec's own formula, so nothing is re-quantized.

Note: mixprec's symmetric RTN scale is signed (negative when a group's largest magnitude is negative, so
the extra level 0 lands on the larger side). The scales are written as they are: compressed-tensors'
decompressor and vLLM's default weight-only kernels (Marlin, Machete, Exllama, the Triton MoE path)
multiply by the scale and assume no sign. Flipping a negative scale would need code 2^b for code 0, so it
cannot be made positive losslessly in b bits. vLLM's opt-in 8-bit-activation Marlin path
(VLLM_MARLIN_INPUT_DTYPE=int8) rescales by the tensor's largest scale and assumes it is positive; the
report counts negative scales so a user can tell.

config.json gains `quantization_config` with one config group per (bit width, group size) scheme (one
symmetry per recipe; an option recipe gives groups their own group size, and RTN and GPTQ codes are stored
alike), each targeting its modules by anchored `re:^<module>$` patterns (all experts of a layer and
projection that share a scheme by one `re:^...experts\\.\\d+\\.<proj>$`), and `ignore` listing every weight
matrix left unquantized (embeddings, head, routers, null groups). Checked before writing: the
source stores experts per expert, no embedding, head or router is quantized, and G divides every quantized
in-features (compressed-tensors' group dequantization requires it). After writing, every header is re-read
and checked against the plan, and the targets must select exactly the quantized modules.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mixprec.checkpoint.compile import (
    CompileConfig,
    build_plan,
    copy_side_files,
    entry_tensors,
    per_layer,
    prepare_compile,
    write_shards,
)
from mixprec.checkpoint.pack import pack_codes
from mixprec.checkpoint.qformat import REPORT_FILE, CompileError
from mixprec.checkpoint.shards import TensorInfo, checkpoint_shards
from mixprec.checkpoint.verify import CompilePlan, PlanEntry, build_report
from mixprec.core.fileio import atomic_dir, atomic_write_json
from mixprec.formats.recipe import Recipe
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import ModelMap
from mixprec.quant import QuantizedWeight

__all__ = ["QUANT_METHOD", "PACK_FORMAT", "SUFFIXES", "Scheme", "schemes", "module_name", "module_target",
           "packed_nbytes", "pack_int32", "ct_tensors", "config_targets", "quantization_config", "verify_ctensors",
           "vllm_fusion_conflicts", "compile_ctensors"]

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
_NEVER_QUANTIZED = (GroupKind.EMBEDDING, GroupKind.LM_HEAD, GroupKind.ROUTER)
_DTYPES = {"weight_packed": "I32", "weight_scale": "F16", "weight_shape": "I64", "weight_zero_point": "I32"}


def module_name(key: str) -> str:
    """The module a checkpoint weight key belongs to (`...q_proj.weight` -> `...q_proj`)."""
    return key.removesuffix(".weight")


def module_target(module: str) -> str:
    """A compressed-tensors target selecting exactly `module` (`re:` targets are applied with re.match)."""
    return f"re:^{re.escape(module)}$"


def packed_nbytes(shape: tuple[int, int], bits: int, group_size: int, symmetric: bool) -> dict[str, int]:
    """Exact bytes of each tensor one [out, in] matrix is stored as, by suffix."""
    rows, cols = shape
    groups = cols // group_size
    sizes = {"weight_packed": rows * math.ceil(cols * bits / 32) * 4, "weight_scale": rows * groups * 2,
             "weight_shape": 16}
    if not symmetric:
        sizes["weight_zero_point"] = math.ceil(rows * bits / 32) * groups * 4
    return sizes


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, ceil(cols*bits/32)] in compressed-tensors' dense layout.

    mixprec's packed rows already hold the bitstream least significant bit first; padding each row to a
    whole number of 4-byte words and reading them as little-endian int32 gives compressed-tensors' words.
    """
    if sys.byteorder != "little":
        raise CompileError("the compressed-tensors writer reinterprets bytes as little-endian int32 words and "
                           "needs a little-endian machine")
    packed = pack_codes(codes, bits)
    packed = torch.nn.functional.pad(packed, (0, -packed.shape[1] % 4))
    return packed.contiguous().view(torch.int32)


def ct_tensors(module: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized matrix, named `<module>.<suffix>`."""
    tensors = {"weight_packed": pack_int32(q.codes, q.bits),
               "weight_scale": q.scales.to(torch.float16).contiguous(),
               "weight_shape": torch.tensor(tuple(q.codes.shape), dtype=torch.int64)}
    if q.zeros is not None:
        tensors["weight_zero_point"] = pack_int32(q.zeros.t().contiguous(), q.bits).t().contiguous()
    return {f"{module}.{suffix}": tensor for suffix, tensor in tensors.items()}


def _check_exportable(recipe: Recipe, model_map: ModelMap) -> None:
    """Refuse, before any work, what compressed-tensors (or vLLM) cannot represent."""
    for name, option in recipe.groups.items():
        if option is None:
            continue
        g = recipe.quant_config(option).group_size  # an option label carries its own group size
        group = model_map.group(name)
        if group.kind in _NEVER_QUANTIZED:
            raise CompileError(f"recipe group {name!r} quantizes a {group.kind.value}; the compressed-tensors "
                               "export keeps embeddings, head and routers unquantized: set it to null")
        for ref in group.weights:
            if ref.fused_on_disk:
                raise CompileError(f"{ref.key} stores experts fused; compressed-tensors needs one module per "
                                   "expert: compile from a checkpoint saved with per-expert keys")
            if ref.shape[1] % g:
                raise CompileError(f"{ref.key} has {ref.shape[1]} input features, not a multiple of group {name!r}'s "
                                   f"group size {g}; compressed-tensors needs whole groups: use a recipe with "
                                   "a group size dividing every quantized in-features, or set that group to null")


def _expert_target(module: str, expert: int) -> str | None:
    """A target selecting every expert of `module`'s layer and projection (its expert index becomes `\\d+`).

    The expert index is the last path segment equal to it (`...experts.5.gate_proj`, Mixtral's
    `...experts.5.w1`); None when there is none.
    """
    parts = module.split(".")
    at = max((i for i, part in enumerate(parts) if part == str(expert)), default=None)
    if at is None:
        return None
    return "re:^" + r"\.".join(r"\d+" if i == at else re.escape(part) for i, part in enumerate(parts)) + "$"


#: A config group's scheme: (bits, group size). Option recipes give groups their own group size.
Scheme = tuple[int, int]


def schemes(plan: CompilePlan) -> dict[str, Scheme]:
    """Each quantized module's (bits, group size): one config group of compressed-tensors per distinct pair."""
    return {module: (bits, plan.group_sizes[module]) for module, bits in plan.bits_map.items()}


def config_targets(scheme_map: dict[str, Scheme], model_map: ModelMap) -> dict[Scheme, list[str]]:
    """scheme -> targets: one `re:^<module>$` per quantized module, except that all experts of a layer and
    projection sharing one scheme get one `\\d+` target (a few hundred targets for a large MoE rather than
    tens of thousands, which every loader matches each module against)."""
    families: dict[str, dict[str, Scheme | None]] = {}
    for group in model_map.groups:
        for ref in group.weights:
            target = None if ref.expert is None else _expert_target(module_name(ref.key), ref.expert)
            if target is not None:
                families.setdefault(target, {})[module_name(ref.key)] = scheme_map.get(module_name(ref.key))
    by_scheme: dict[Scheme, list[str]] = {}
    covered: set[str] = set()
    for target, members in families.items():
        found = set(members.values())
        if len(found) == 1 and None not in found:
            by_scheme.setdefault(found.pop(), []).append(target)  # type: ignore[arg-type]
            covered.update(members)
    for module, scheme in scheme_map.items():
        if module not in covered:
            by_scheme.setdefault(scheme, []).append(module_target(module))
    return {scheme: sorted(targets) for scheme, targets in sorted(by_scheme.items())}


def quantization_config(recipe: Recipe, plan: CompilePlan, model_map: ModelMap) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group per (width, group size), anchored targets, the
    rest ignored."""
    q = recipe.quantizer
    ignore = [module_name(key) for group in model_map.groups for key in group.keys
              if module_name(key) not in plan.bits_map]
    groups = {f"group_{i}": {"targets": targets, "format": PACK_FORMAT, "input_activations": None,
                             "output_activations": None,
                             "weights": {"num_bits": bits, "type": "int", "symmetric": q.symmetric,
                                         "strategy": "group", "group_size": size, "dynamic": False,
                                         "actorder": None}}
              for i, ((bits, size), targets) in enumerate(config_targets(schemes(plan), model_map).items())}
    return {"quant_method": QUANT_METHOD, "format": PACK_FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(dict.fromkeys(ignore)), "kv_cache_scheme": None,
            "global_compression_ratio": None}


def _encode(entry: PlanEntry, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    return ct_tensors(entry.name, q)


def _fail(folder: Path, what: str) -> CompileError:
    return CompileError(f"verification of the compressed-tensors folder {folder} failed: {what}; this is a bug in "
                        "mixprec compile, please report it with the recipe")


def _expected_shapes(entry: PlanEntry, group_size: int) -> dict[str, tuple[int, ...]]:
    assert entry.ref is not None and entry.bits is not None
    rows, cols = entry.ref.shape
    shapes: dict[str, tuple[int, ...]] = {"weight_packed": (rows, math.ceil(cols * entry.bits / 32)),
                                          "weight_scale": (rows, cols // group_size), "weight_shape": (2,),
                                          "weight_zero_point": (math.ceil(rows * entry.bits / 32), cols // group_size)}
    return shapes


def _check_entry(folder: Path, entry: PlanEntry, plan: CompilePlan, tensors: dict[str, TensorInfo]) -> int:
    """Check one plan entry's stored tensors; returns how many tensors it accounts for."""
    if entry.ref is None:
        info = tensors.get(entry.name)
        if info is None or info.nbytes != entry.nbytes:
            raise _fail(folder, f"copied tensor {entry.name} is missing or has the wrong size")
        return 1
    suffixes = SUFFIXES if not plan.symmetric else SUFFIXES[:3]
    shapes = _expected_shapes(entry, plan.group_sizes[entry.name])
    for suffix in suffixes:
        info = tensors.get(f"{entry.name}.{suffix}")
        if info is None or info.dtype != _DTYPES[suffix] or info.shape != shapes[suffix]:
            raise _fail(folder, f"{entry.name}.{suffix} is missing or is not {_DTYPES[suffix]} {shapes[suffix]} "
                                f"at {entry.bits} bits")
    return len(suffixes)


def _selected(targets: list[str], modules: set[str], literal: dict[str, str]) -> list[str]:
    """Modules the targets select under compressed-tensors' rule (`re:` -> re.match). A fully escaped,
    anchored target selects only its own name, so it is looked up rather than matched against every module."""
    found = []
    for target in targets:
        if target in literal:
            found.append(literal[target])
        else:
            pattern = re.compile(target.removeprefix("re:"))
            found.extend(m for m in modules if pattern.match(m))
    return found


def _check_targets(folder: Path, qconfig: dict[str, Any], plan: CompilePlan, modules: set[str]) -> None:
    """Each config group must select exactly its scheme's modules, no module twice, and `ignore` none of them."""
    literal = {module_target(m): m for m in modules}
    seen: list[str] = []
    for group in qconfig["config_groups"].values():
        selected = _selected(group["targets"], modules, literal)
        scheme = (group["weights"]["num_bits"], group["weights"]["group_size"])
        wanted = {base for base, found in schemes(plan).items() if found == scheme}
        if set(selected) != wanted:
            raise _fail(folder, f"the {scheme[0]}-bit g{scheme[1]} targets select "
                                f"{sorted(set(selected) ^ wanted)[:3]} wrongly")
        seen.extend(selected)
    if len(seen) != len(set(seen)):
        raise _fail(folder, "a module is selected by more than one target")
    if set(qconfig["ignore"]) & set(plan.bits_map):
        raise _fail(folder, "quantization_config.ignore lists quantized modules")


def verify_ctensors(folder: Path, plan: CompilePlan) -> None:
    """Re-read every header of the written folder and check tensors, dtypes, shapes and targets."""
    tensors = {name: info for h in checkpoint_shards(folder) for name, info in h.tensors.items()}
    expected = sum(_check_entry(folder, entry, plan, tensors) for entry in plan.entries())
    if len(tensors) != expected:
        raise _fail(folder, f"the shards hold {len(tensors)} tensors, the plan has {expected}")
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    _check_targets(folder, qconfig, plan, {name.rpartition(".")[0] for name in tensors})


def _validate_with_library(qconfig: dict[str, Any]) -> str | None:
    """Validate the config with compressed-tensors' own model when the optional package is installed.

    Returns the library version used, or None when it is not installed (the folder is still checked by
    `verify_ctensors`; `pip install mixprec[ctensors]` adds this check).
    """
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        log.info("compressed-tensors is not installed; its config model was not run on the output")
        return None
    try:
        QuantizationConfig.model_validate(qconfig)
    except Exception as exc:  # pydantic's ValidationError; any failure here is our bug
        raise CompileError(f"compressed-tensors {compressed_tensors.__version__} rejects the written "
                           f"quantization_config ({exc}); this is a bug in mixprec compile") from exc
    return str(compressed_tensors.__version__)


_FUSED = ((re.compile(r"(.+)\.(?:q_proj|k_proj|v_proj)"), "qkv_proj"),
          (re.compile(r"(.+)\.(?:gate_proj|up_proj|w1|w3)"), "gate_up_proj"))


def vllm_fusion_conflicts(model_map: ModelMap, scheme_map: Mapping[str, object]) -> list[str]:
    """vLLM modules whose parts the recipe gives different schemes (width, or width and group size; None =
    unquantized counts as a scheme).

    vLLM loads q/k/v into one `qkv_proj`, gate/up into one `gate_up_proj`, and all experts of a layer into
    one FusedMoE, each with a single scheme; such a checkpoint is valid compressed-tensors but vLLM will
    refuse it. Returned as a warning, not an error: other runtimes load these modules apart.
    """
    widths: dict[str, set[object]] = {}
    for group in model_map.groups:
        for ref in group.weights:
            module = module_name(ref.key)
            fused = ref.param.rpartition(".")[0] if ref.expert is not None else None
            for pattern, suffix in _FUSED if fused is None else ():
                match = pattern.fullmatch(module)
                fused = f"{match.group(1)}.{suffix}" if match else fused
            if fused is not None:
                widths.setdefault(fused, set()).add(scheme_map.get(module))
    return sorted(name for name, seen in widths.items() if len(seen) > 1)


class _ScaleSigns:
    """Counts negative scales while tensors are produced (reported; see the module note)."""

    def __init__(self) -> None:
        self.negative = 0
        self.total = 0

    def count(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, tensor in tensors.items():
            if name.endswith(".weight_scale"):
                self.negative += int((tensor < 0).sum())
                self.total += tensor.numel()
        return tensors


def _finish_report(report: dict[str, Any], plan: CompilePlan, model_map: ModelMap,
                   signs: _ScaleSigns, validated_by: str | None) -> dict[str, Any]:
    conflicts = vllm_fusion_conflicts(model_map, schemes(plan))
    if conflicts:
        log.warning("vLLM fuses modules the recipe gives different widths (e.g. %s); vLLM will not load this "
                    "checkpoint, other compressed-tensors readers will; for vLLM search with --granularity fine "
                    "(the default, auto, gives every routed expert its own width)", conflicts[:3])
    report.update({"format": QUANT_METHOD, "pack_format": PACK_FORMAT, "negative_scales": signs.negative,
                   "scales": signs.total, "vllm_fusion_conflicts": conflicts,
                   "compressed_tensors_validated": validated_by})
    return report


def compile_ctensors(recipe: Recipe, checkpoint: Checkpoint, work_dir: str | Path, out_dir: str | Path,
                     config: CompileConfig | None = None) -> dict[str, Any]:
    """Compile `recipe` into a compressed-tensors `pack-quantized` folder at `out_dir`; returns the report.

    Validated before anything is written (as `compile_recipe`, plus what compressed-tensors cannot hold);
    written into a temporary folder, verified, and moved into place.
    """
    config = config or CompileConfig()
    started = time.perf_counter()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    model_map, variants = prepare_compile(recipe, checkpoint, work_dir, out_dir, config.force)
    _check_exportable(recipe, model_map)
    plan = build_plan(recipe, model_map, checkpoint, variants, config.max_shard_bytes, packed_nbytes, SUFFIXES)
    signs = _ScaleSigns()
    qconfig = quantization_config(recipe, plan, model_map)
    validated_by = _validate_with_library(qconfig)
    with atomic_dir(out_dir) as tmp:
        write_shards(tmp, plan, recipe.to_yaml(),
                     per_layer(variants, lambda e: signs.count(entry_tensors(e, checkpoint, variants, _encode))))
        source_config = dict(checkpoint.config) | {"quantization_config": qconfig}
        (tmp / "config.json").write_text(json.dumps(source_config, indent=2, sort_keys=True) + "\n")
        side_files = copy_side_files(checkpoint.path, tmp, set(checkpoint.files))
        if config.verify:
            verify_ctensors(tmp, plan)
        report = build_report(tmp, recipe, checkpoint, variants, plan, side_files, config.max_shard_bytes,
                              time.perf_counter() - started)
        atomic_write_json(tmp / REPORT_FILE, _finish_report(report, plan, model_map, signs, validated_by))
    log.info("compiled %s (compressed-tensors): %d shard(s), %d of %d scales negative", out_dir,
             len(plan.shards), signs.negative, signs.total)
    return report
