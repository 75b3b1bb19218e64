"""The bundled model compiled to compressed-tensors and read back by compressed-tensors itself, beside mixprec's format.

One recipe (layer granularity: attention and shared experts 4 bits, dense MLP 3, routed experts 2; RTN,
group 64 by default) is compiled into both formats in one run. compressed-tensors' own model-free reader
(`CompressedTensorsDequantizer`) decompresses every tensor of the compressed-tensors folder, and each
quantized matrix is compared bit for bit with `mixprec.load` of the mixprec folder in fp16 (the dtype
compressed-tensors dequantizes in). Printed and written as JSON: matrices compared and mismatches, compile
seconds of both formats (interleaved, median of the repeats, so the ratio is from the same machine state),
the quantized bytes of each against the variants' manifests, the share of negative scales, the number of
config targets and the vLLM fusion conflicts.

Run: .venv/bin/python benchmarks/ctensors_bundled.py --work /tmp/ct-bench [--group-size 64] [--repeats 3]
     [--json benchmarks/results/ctensors_bundled.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from compressed_tensors import __version__ as ct_version
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from safetensors.torch import load_file

from mixprec.bundled import bundled_model_path
from mixprec.checkpoint.compile import compile_recipe
from mixprec.checkpoint.ctensors import compile_ctensors
from mixprec.checkpoint.load import load
from mixprec.checkpoint.shards import checkpoint_shards
from mixprec.formats.recipe import ModelRef, Recipe
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint
from mixprec.quant import QuantSettings
from mixprec.quant.variants import ensure_variants

WIDTHS = {GroupKind.ATTENTION: 4, GroupKind.SHARED_EXPERTS: 4, GroupKind.DENSE_MLP: 3, GroupKind.ROUTED_EXPERTS: 2}


def _timed_compiles(recipe: Recipe, checkpoint: Checkpoint, work: Path, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"mixprec": [], "compressed-tensors": []}
    reports: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for name, writer in (("mixprec", compile_recipe), ("compressed-tensors", compile_ctensors)):
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            reports[name] = writer(recipe, checkpoint, work, out)
            times[name].append(time.perf_counter() - started)
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "reports": reports}


def _compare(recipe: Recipe, checkpoint: Checkpoint, work: Path) -> tuple[int, list[str]]:
    reader = CompressedTensorsDequantizer(work / "compressed-tensors", dtype=torch.float16)
    decompressed: dict[str, torch.Tensor] = {}
    for header in checkpoint_shards(work / "compressed-tensors"):
        decompressed.update(reader.validate(load_file(header.path)))
    params = dict(load(work / "mixprec", dtype=torch.float16).named_parameters())
    model_map = checkpoint.model_map(recipe.granularity)
    refs = [ref for name, bits in recipe.groups.items() if bits is not None for ref in model_map.group(name).weights]
    bad = [ref.key for ref in refs if not torch.equal(decompressed[ref.key], ref.slice_memory(params[ref.param]))]
    return len(refs), bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for variants and both outputs")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    checkpoint = Checkpoint.open(bundled_model_path())
    model_map = checkpoint.model_map("layer")
    settings = QuantSettings(group_size=args.group_size)
    recipe = Recipe(ModelRef(checkpoint.path.name, checkpoint.model_type, checkpoint.fingerprint),
                    model_map.granularity, settings, {g.name: WIDTHS[g.kind] for g in model_map.select()})
    ensure_variants(checkpoint, model_map, [settings.config(b) for b in sorted(set(WIDTHS.values()))], args.work)
    timed = _timed_compiles(recipe, checkpoint, args.work, args.repeats)
    compared, mismatches = _compare(recipe, checkpoint, args.work)
    ct, mp = timed["reports"]["compressed-tensors"], timed["reports"]["mixprec"]
    qconfig = json.loads((args.work / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    result = {
        "compressed_tensors_version": ct_version, "group_size": args.group_size, "matrices_compared": compared,
        "mismatches": mismatches, "compile_seconds": timed["seconds"],
        "compile_ratio_ct_over_mixprec": timed["seconds"]["compressed-tensors"] / timed["seconds"]["mixprec"],
        "predicted_quantized_bytes": ct["predicted"]["quantized_bytes"],
        "quantized_bytes": {"mixprec": mp["actual"]["quantized_bytes"], "compressed-tensors":
                            ct["actual"]["quantized_bytes"]},
        "negative_scale_share": ct["negative_scales"] / ct["scales"], "scales": ct["scales"],
        "targets": sum(len(g["targets"]) for g in qconfig["config_groups"].values()),
        "vllm_fusion_conflicts": ct["vllm_fusion_conflicts"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
