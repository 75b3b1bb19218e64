"""`mixprec quantize [MODEL] --bits 2 3 4 5 6 8`: write one uniform variant per bit width.

Each variant (integer codes + fp16 scales as safetensors, plus manifest.json with the model
fingerprint, quantizer settings and exact bits per group) goes to WORK/variants/<variant id>/.
Finished variants with the same model and settings are reused, so re-running is cheap and an
interrupted run continues where it stopped.

GPTQ (`--method gptq`) also needs calibration activations: by default a few dozen windows of the
bundled corpus's train split (disjoint from the "calibration" split that measurement uses and from
the "evaluation" split), or `--calib-data FILES`. Their Hessians are computed once, cached under
WORK/calibration/, and shared by every bit width; the manifests record the data and per-expert
token counts.

Usage:
    mixprec quantize --bits 2 3 4 5 6 8
    mixprec quantize path/to/model --bits 3 4 --group-size 128 --asym --work work/mymodel
    mixprec quantize --method gptq --bits 2 3 4 --calib-windows 32 --damp 0.01
    mixprec quantize --method gptq --bits 4 --streaming on     Hessians with one layer resident at a time
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mixprec.cli.auto import resolve_options
from mixprec.cli.checks import check_windows
from mixprec.cli.common import add_model_argument, add_work_argument, default_work_dir, print_table
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS, GroupKind
from mixprec.model.data import max_positions
from mixprec.model.loading import Checkpoint, resolve_model_path
from mixprec.model.streaming import STREAMING_MODES
from mixprec.quant import (
    SUPPORTED_GROUP_SIZES,
    QuantConfig,
    QuantSettings,
    quantizer_class,
    quantizer_names,
)
from mixprec.quant.calibration import Calibration, calibration_windows
from mixprec.quant.gptq import GPTQSettings
from mixprec.quant.hessians import CalibConfig
from mixprec.quant.options import option_configs, parse_families
from mixprec.quant.variants import ensure_variants

__all__ = ["register", "configs_from_args", "calibration_settings", "add_calibration_arguments",
           "quantize_calibrated"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quantize", help="quantize the model uniformly at several bit widths",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_work_argument(parser)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], metavar="B",
                        help="bit widths, each a width of --method (rtn, gptq: 2-8; gguf, gguf-imatrix: 2-6, 8; "
                             "gguf-iq: 1 (IQ1_M) to 6, 8) (default: 2 3 4 5 6 8)")
    parser.add_argument("--group-size", type=int, default=None, choices=SUPPORTED_GROUP_SIZES,
                        help="weights per scale along the input dimension, one size (default: GPTQ at 64, 32 and "
                             "128, as measure and search use them, see --options)")
    parser.add_argument("--asym", action="store_true", help="asymmetric (integer zero point per group)")
    parser.add_argument("--method", default=QuantSettings.method, choices=quantizer_names(),
                        help=f"quantizer (default {QuantSettings.method})")
    parser.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=QuantSettings.clip_search,
                        help="per-group MSE clipping search instead of sign-aware absmax scales (default off: "
                             "it lowers weight error but raised whole-model KL on the bundled model)")
    parser.add_argument("--kinds", nargs="+", default=[k.value for k in DEFAULT_QUANTIZED_KINDS],
                        choices=[k.value for k in GroupKind], metavar="KIND",
                        help="group kinds to quantize (default: attention dense_mlp shared_experts "
                             "routed_experts; add router, embedding or lm_head to include them)")
    parser.add_argument("--options", nargs="*", default=None, metavar="FAMILY",
                        help="option families to quantize, each at every --bits width, e.g. rtn-g32 rtn-g128 "
                             "gptq-g64 (<method>-g<group size>; --asym/--clip-search apply to all); replaces "
                             "--method/--group-size (default gptq-g64 gptq-g32 gptq-g128, or "
                             "rtn-g64 rtn-g32 rtn-g128 where GPTQ cannot run: Hessians too large for memory or no "
                             "tokenizer to calibrate with; one setting with --method or --group-size; no family: "
                             "one)")
    add_calibration_arguments(parser)
    parser.set_defaults(run=run)


def add_calibration_arguments(parser: argparse.ArgumentParser, streaming: bool = True) -> None:
    """The calibration flags of the methods that need Hessians; measure and search take them too (they quantize
    missing GPTQ variants themselves) and have their own `--streaming`, so they pass `streaming=False`."""
    calib = parser.add_argument_group("calibration (gptq, gguf-imatrix, gguf-iq)")
    calib.add_argument("--calib-windows", type=int, default=CalibConfig.num_windows, metavar="N",
                       help=f"calibration windows (default {CalibConfig.num_windows})")
    calib.add_argument("--calib-seq-len", type=int, default=None, metavar="T",
                       help=f"tokens per calibration window (default {CalibConfig.seq_len}, or the model's positions "
                            "if fewer)")
    calib.add_argument("--calib-data", type=Path, nargs="+", default=None, metavar="FILE",
                       help="text files to calibrate on, tokenized with the model's tokenizer (default: the "
                            "bundled corpus's train split, disjoint from measurement and evaluation data)")
    calib.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=GPTQSettings.act_order,
                       help="visit columns by decreasing Hessian diagonal, with group scales fixed up front "
                            f"(default {'on' if GPTQSettings.act_order else 'off'})")
    calib.add_argument("--damp", type=float, default=GPTQSettings.damp,
                       help=f"Hessian dampening as a fraction of its mean diagonal (default {GPTQSettings.damp})")
    if streaming:
        calib.add_argument("--streaming", choices=STREAMING_MODES, default="auto",
                           help="collect the Hessians reading each layer's weights only while it runs (on), on "
                                "the whole fp32 model (off), or stream when it exceeds half the free memory "
                                "(default auto)")


def configs_from_args(args: argparse.Namespace) -> list[QuantConfig]:
    """Validated settings, one per requested bit width and option family (duplicates removed, order kept)."""
    resolve_options(args, 64)
    settings = QuantSettings(method=args.method, group_size=args.group_size, symmetric=not args.asym,
                             clip_search=args.clip_search)
    widths = list(dict.fromkeys(args.bits))
    if getattr(args, "options", None):
        return option_configs(parse_families(args.options, settings), widths)
    return [settings.config(bits) for bits in widths]


def calibration_settings(args: argparse.Namespace) -> tuple[CalibConfig, GPTQSettings] | None:
    """Validated calibration and solver settings when some method asked for needs the Hessian, else None."""
    if not any(quantizer_class(c.method).needs_hessian for c in configs_from_args(args)):
        return None
    return _settings(args)


def _settings(args: argparse.Namespace) -> tuple[CalibConfig, GPTQSettings]:
    """Validated calibration and solver settings; an unset window length is the default one, cut to the model's
    positions so that a default GPTQ run works on a model with short positions instead of failing."""
    if args.calib_seq_len is None:
        limit = max_positions(resolve_model_path(args.model)) or CalibConfig.seq_len
        args.calib_seq_len = min(CalibConfig.seq_len, limit)
    check_windows(args.model, args.calib_seq_len, "--calib-seq-len")
    return (CalibConfig(num_windows=args.calib_windows, seq_len=args.calib_seq_len),
            GPTQSettings(damp=args.damp, act_order=args.act_order))


def _calibration(args: argparse.Namespace, checkpoint: Checkpoint, work: Path,
                 settings: tuple[CalibConfig, GPTQSettings]) -> Calibration:
    windows = calibration_windows(checkpoint.path, settings[0], args.calib_data)
    return Calibration(checkpoint, windows, settings[0], work / "calibration", settings[1], args.streaming)


def quantize_calibrated(args: argparse.Namespace, configs: list[QuantConfig], kinds: tuple[GroupKind, ...],
                        work: Path) -> None:
    """Quantize the variants among `configs` whose method needs a Hessian (GPTQ), with the calibration flags, where
    they are missing: the measure step quantizes the others itself but has no calibration data of its own.
    Finished variants are reused, so this costs a check when they exist."""
    calibrated = [c for c in dict.fromkeys(configs) if quantizer_class(c.method).needs_hessian]
    if not calibrated:
        return
    settings = _settings(args)
    if getattr(args, "data", None) and not args.calib_data:
        log.warning("GPTQ calibrates on the bundled corpus's train split (Python source), not on --data; give "
                    "--calib-data with text like it (other files than --data's) to calibrate on your domain")
    checkpoint = Checkpoint.open(args.model)
    ensure_variants(checkpoint, checkpoint.model_map("layer"), calibrated, work, kinds,
                    _calibration(args, checkpoint, work, settings))


def run(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)  # validate before touching the model
    settings = calibration_settings(args)
    checkpoint = Checkpoint.open(args.model)
    model_map = checkpoint.model_map("layer")
    kinds = tuple(GroupKind(k) for k in args.kinds)
    work = default_work_dir(args.model, args.work)
    calibration = None if settings is None else _calibration(args, checkpoint, work, settings)
    # only the methods that need the Hessian get the calibration (it is part of their variants' identity)
    plain = [c for c in configs if not quantizer_class(c.method).needs_hessian]
    variants = ensure_variants(checkpoint, model_map, plain, work, kinds)
    variants += ensure_variants(checkpoint, model_map, [c for c in configs if c not in plain], work, kinds,
                                calibration)
    rows = [{"variant": v.manifest.variant_id, "bpw": f"{v.manifest.totals.bpw:.4f}",
             "params": v.manifest.totals.params,
             "MiB": f"{v.manifest.totals.storage_bits / 8 / 2**20:.2f}", "folder": str(v.path)}
            for v in variants]
    print_table(rows, ["variant", "bpw", "params", "MiB", "folder"])
    return 0
