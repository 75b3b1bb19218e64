"""`mixprec compile RECIPE --out DIR [--format NAME]`: build one bit-packed checkpoint from a recipe and its variants.

RECIPE is a mixprec recipe YAML, or an exllamav3 override YAML (`sources` / `overrides`) whose
sources are mixprec variant folders (WORK/variants/<id>); the latter needs --base-bits, the width of
tensors no override matches (exllamav3's `-i`). The output folder is written atomically and verified;
the table printed compares the bytes the variants' manifests predict with the bytes stored.

Usage:
    mixprec compile work/stdlib-moe/recipe.yaml --out out/stdlib-moe-3bpw
    mixprec compile recipe.yaml --out out/q --model path/to/model --work work/model --max-shard-size 500MB
    mixprec compile overrides.yaml --base-bits 4 --out out/q
    mixprec compile recipe.yaml --format compressed-tensors --out out/q-vllm
    mixprec compile gguf-recipe.yaml --format gguf --out out/model.gguf --export-llama-quantize out/types.txt

Basic:    RECIPE, --out, --model (default: the bundled model), --work (default: ./work/<model name>),
          --format (default mixprec; see mixprec.checkpoint.registry for the others)
Advanced: --max-shard-size (default 2GB), --base-bits and --granularity (override YAML only),
          --export-llama-quantize FILE (a `llama-quantize --tensor-type-file` reproducing a ggml recipe's types)

`--format gguf` needs a recipe searched with a ggml quantizer (--method gguf, gguf-imatrix, gguf-iq); --out is
then the .gguf file llama.cpp loads (`mixprec.checkpoint.gguf`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from mixprec.checkpoint.compile import CompileConfig
from mixprec.checkpoint.gguf import llama_quantize_types
from mixprec.checkpoint.qformat import CompileError
from mixprec.checkpoint.registry import COMPILED_FORMATS, DEFAULT_FORMAT, compiled_format, format_names
from mixprec.checkpoint.shards import parse_size
from mixprec.cli.common import add_work_argument, default_work_dir, print_table
from mixprec.formats.llamacpp import write_tensor_type_file
from mixprec.formats.recipe import ModelRef, Recipe
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import DEFAULT_GRANULARITY, Granularity
from mixprec.quant.variants import Variant

__all__ = ["register", "read_recipe", "recipe_from_exl3", "size_rows"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compile", help="compile a recipe into one bit-packed checkpoint",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, metavar="RECIPE", help="recipe YAML or exllamav3 override YAML")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output checkpoint folder")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="the model the recipe was made for (default: the bundled stdlib MoE)")
    add_work_argument(parser)
    parser.add_argument("--format", choices=format_names(), default=DEFAULT_FORMAT,
                        help="compiled format: " + "; ".join(f"{f.name}: {f.help}" for f in COMPILED_FORMATS.values())
                        + f" (default {DEFAULT_FORMAT})")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="largest shard, e.g. 2GB, 500MB, 64KiB (default 2GB)")
    parser.add_argument("--base-bits", type=int, default=None, metavar="B",
                        help="override YAML only: bits of tensors that no override key matches")
    parser.add_argument("--granularity", choices=[g.value for g in Granularity], default=DEFAULT_GRANULARITY,
                        help=f"override YAML only: group granularity to read it at (default {DEFAULT_GRANULARITY})")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it holds files an earlier compile did not write (they are deleted)")
    parser.add_argument("--export-llama-quantize", type=Path, default=None, metavar="FILE",
                        help="also write a llama-quantize --tensor-type-file with the recipe's ggml types")
    parser.set_defaults(run=run)


def _is_exl3(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # Recipe.load reports it with the file name
    return isinstance(data, dict) and "sources" in data and "overrides" in data


def recipe_from_exl3(path: Path, checkpoint: Checkpoint, base_bits: int | None,
                     granularity: str) -> tuple[Recipe, Path]:
    """A recipe equivalent to an override YAML over mixprec variants, and the work folder holding them."""
    from mixprec.formats.exl3 import Exl3Overrides, exl3_to_groups, source_bits

    if base_bits is None:
        raise CompileError(f"{path} is an exllamav3 override YAML: pass --base-bits B, the width of tensors "
                           "no override key matches (exllamav3's -i)")
    overrides = Exl3Overrides.load(path)
    folders = [Path(s.model_dir) for s in overrides.sources]
    variants = [Variant.open(folder, checkpoint.fingerprint) for folder in folders]
    parents = {folder.resolve().parent for folder in folders}
    if len(parents) != 1 or next(iter(parents)).name != "variants":
        raise CompileError(f"{path}: every source must be a mixprec variant folder in one WORK/variants/ folder, "
                           f"got {[str(f) for f in folders]}")
    settings = {v.config.settings for v in variants}
    if len(settings) != 1:
        raise CompileError(f"{path}: the sources were quantized with different settings {settings}; "
                           "a compiled checkpoint has one method, group size and symmetry")
    model_map = checkpoint.model_map(granularity)
    groups = exl3_to_groups(overrides, model_map, {s.model_dir: source_bits(s.model_dir) for s in overrides.sources},
                            base_bits)
    recipe = Recipe(ModelRef(checkpoint.path.name, checkpoint.model_type, checkpoint.fingerprint),
                    model_map.granularity, settings.pop(), dict(groups),
                    provenance={"source": f"exllamav3 override YAML {path}", "base_bits": base_bits})
    return recipe, next(iter(parents)).parent


def read_recipe(args: argparse.Namespace, checkpoint: Checkpoint) -> tuple[Recipe, Path]:
    """The recipe to compile and the work folder with its variants."""
    if _is_exl3(args.recipe):
        return recipe_from_exl3(args.recipe, checkpoint, args.base_bits, args.granularity)
    return Recipe.load(args.recipe), default_work_dir(args.model, args.work)


def size_rows(report: dict[str, object]) -> list[dict[str, object]]:
    """Predicted vs actual bytes, quantized tensors and whole checkpoint."""
    predicted, actual = report["predicted"], report["actual"]
    assert isinstance(predicted, dict) and isinstance(actual, dict)
    rows = [("quantized tensors", predicted["quantized_bytes"], actual["quantized_bytes"]),
            ("all tensors", predicted["tensor_bytes"], actual["tensor_bytes"]),
            ("whole folder (+ headers, config, tokenizer)", predicted["tensor_bytes"], actual["folder_bytes"])]
    return [{"what": what, "predicted": f"{p:,.0f}", "actual": f"{a:,}",
             "actual/predicted": f"{a / p:.5f}" if p else "-"} for what, p, a in rows]


def run(args: argparse.Namespace) -> int:
    config = CompileConfig(max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    checkpoint = Checkpoint.open(args.model)
    recipe, work = read_recipe(args, checkpoint)
    types = None if args.export_llama_quantize is None else llama_quantize_types(recipe, checkpoint)
    report = compiled_format(args.format).writer()(recipe, checkpoint, work, args.out, config)
    bits = report["bits"]
    bpw = report["actual"]["bpw"]  # None when every group is null: a plain re-shard
    quantized = "no quantized weights" if bpw is None else f"{bpw:.4f} bpw over quantized weights"
    print(f"compiled {args.out} ({args.format}): {len(report['shards'])} shard(s), {quantized}, "
          f"in {report['elapsed_s']:.1f} s")
    print_table([{"bits": b, "matrices": row["matrices"], "params": row["params"]} for b, row in bits.items()],
                ["bits", "matrices", "params"])
    print_table(size_rows(report), ["what", "predicted", "actual", "actual/predicted"])
    if types is not None:
        write_tensor_type_file(str(args.export_llama_quantize), types)
        print(f"wrote {args.export_llama_quantize} ({len(types)} tensor types for llama-quantize --pure)")
    return 0
