"""`mixprec quantize [MODEL] --bits 2 3 4 5 6 8`: write one uniform variant per bit width.

Each variant (integer codes + fp16 scales as safetensors, plus manifest.json with the model
fingerprint, quantizer settings and exact bits per group) goes to WORK/variants/<variant id>/.
Finished variants with the same model and settings are reused, so re-running is cheap and an
interrupted run continues where it stopped.

Usage:
    mixprec quantize --bits 2 3 4 5 6 8
    mixprec quantize path/to/model --bits 3 4 --group-size 128 --asym --work work/mymodel
"""

from __future__ import annotations

import argparse

from mixprec.arch import DEFAULT_QUANTIZED_KINDS, GroupKind
from mixprec.cli.common import add_model_argument, add_work_argument, default_work_dir, print_table
from mixprec.loading import Checkpoint
from mixprec.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantConfig, quantizer_names
from mixprec.variants import ensure_variants

__all__ = ["register", "configs_from_args"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quantize", help="quantize the model uniformly at several bit widths",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_work_argument(parser)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], metavar="B",
                        help=f"bit widths, each one of {SUPPORTED_BITS} (default: 2 3 4 5 6 8)")
    parser.add_argument("--group-size", type=int, default=64, choices=SUPPORTED_GROUP_SIZES,
                        help="weights per scale along the input dimension (default 64)")
    parser.add_argument("--asym", action="store_true", help="asymmetric (integer zero point per group)")
    parser.add_argument("--method", default="rtn", choices=quantizer_names(), help="quantizer (default rtn)")
    parser.add_argument("--no-clip-search", action="store_true",
                        help="plain min/max scales instead of the per-group MSE clipping search")
    parser.add_argument("--kinds", nargs="+", default=[k.value for k in DEFAULT_QUANTIZED_KINDS],
                        choices=[k.value for k in GroupKind], metavar="KIND",
                        help="group kinds to quantize (default: attention dense_mlp shared_experts "
                             "routed_experts; add router, embedding or lm_head to include them)")
    parser.set_defaults(run=run)


def configs_from_args(args: argparse.Namespace) -> list[QuantConfig]:
    """Validated settings, one per requested bit width (duplicates removed, order kept)."""
    return [QuantConfig(method=args.method, bits=bits, group_size=args.group_size, symmetric=not args.asym,
                        clip_search=not args.no_clip_search)
            for bits in dict.fromkeys(args.bits)]


def run(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)  # validate before touching the model
    checkpoint = Checkpoint.open(args.model)
    model_map = checkpoint.model_map("layer")
    kinds = tuple(GroupKind(k) for k in args.kinds)
    work = default_work_dir(args.model, args.work)
    variants = ensure_variants(checkpoint, model_map, configs, work, kinds)
    rows = [{"variant": v.manifest["variant_id"], "bpw": f"{v.manifest['totals']['bpw']:.4f}",
             "params": v.manifest["totals"]["params"],
             "MiB": f"{v.manifest['totals']['storage_bits'] / 8 / 2**20:.2f}", "folder": str(v.path)}
            for v in variants]
    print_table(rows, ["variant", "bpw", "params", "MiB", "folder"])
    return 0
