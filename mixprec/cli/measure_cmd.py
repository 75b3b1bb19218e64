"""`mixprec measure [MODEL]`: end-to-end KL of every group at every bit width (swap one group at a time).

drop mode lowers one group from the unquantized model; raise mode raises one group from a model with
every group at --base-bits (exllamav3's direction); split mode (--granularity expert) gives every routed
expert its own rows without measuring it alone: the fine table's expert losses are divided among the
experts by each one's router-weighted output error (`mixprec.measure.split`). Missing variants are quantized first (as
`mixprec quantize` would). Every finished (group, bits) result is stored at once in an Optuna
journal, so an interrupted run continues where it stopped, and several workers (--workers N here, or
the same command started elsewhere with a shared --storage URL) split one table.

Writes WORK/measure/<mode>-<granularity>/{table.csv, summary.json, measurement.json, journal.log}. The default
`--granularity auto` measures the fine table and splits it per routed expert and projection (split-expert-fine)
for a MoE model, the fine table alone otherwise (`mixprec.cli.auto`).

Basic:
    mixprec measure --bits 2 3 4 5 6 8
    mixprec measure --mode raise --base-bits 2 --bits 3 4 5 6 8
    mixprec measure --mode split --granularity expert   # per-expert rows from the fine table, one extra pass
    mixprec measure path/to/model --granularity fine --windows 16 --seq-len 512 --data a.txt b.txt

Advanced:
    --storage postgresql+psycopg://user:pw@host/db    share one table between machines (pip install mixprec[postgres])
    --workers 2                                      worker processes on this machine
    --reset-stale                                    re-run jobs left RUNNING by workers known to be gone
    --max-jobs 10                                    measure at most 10 jobs in this run
    --streaming on --max-memory 24GB                 one layer's weights resident at a time, within 24 GB
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from mixprec.checkpoint.shards import parse_size
from mixprec.cli.auto import AUTO, GRANULARITY_CHOICES, resolve_granularity, resolve_options
from mixprec.cli.checks import check_storage_arg, check_windows
from mixprec.cli.common import add_model_argument, add_work_argument, default_work_dir, print_table
from mixprec.cli.quantize_cmd import add_calibration_arguments, quantize_calibrated
from mixprec.core.errors import MixprecError
from mixprec.measure.config import MODES, MeasureConfig
from mixprec.measure.engine.core import EngineConfig
from mixprec.measure.run import run_measure
from mixprec.measure.table import format_table, load_measurement
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS, GroupKind
from mixprec.model.streaming import STREAMING_MODES
from mixprec.quant import SUPPORTED_GROUP_SIZES, QuantSettings, quantizer_names
from mixprec.quant.options import parse_families

__all__ = ["register", "config_from_args"]


def _add_basic(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_work_argument(parser)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], metavar="B",
                        help="bit widths to measure, each a width of --method (rtn, gptq: 2-8; gguf, gguf-imatrix: "
                             "2-6, 8; gguf-iq: 1 (IQ1_M) to 6, 8) (default: 2 3 4 5 6 8)")
    parser.add_argument("--mode", choices=list(MODES), default=None,
                        help="drop: lower one group from full precision; raise: raise one group from --base-bits; "
                             "split (with --granularity expert or expert-fine): split the fine table's expert losses "
                             "per expert (default: split where --granularity auto picks expert-fine, else drop)")
    parser.add_argument("--base-bits", type=int, default=2, metavar="B", help="raise mode's base width (default 2)")
    parser.add_argument("--granularity", choices=GRANULARITY_CHOICES, default=AUTO,
                        help="group per layer block, per projection, or per routed expert (default auto: "
                             "expert-fine split from the fine table for MoE models, fine for ggml types or dense "
                             "models)")
    parser.add_argument("--windows", type=int, default=32, help="token windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--data", type=Path, nargs="+", default=None, metavar="FILE",
                        help="text files to measure on (default: the model folder's calibration split)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the engine runs (default auto: CUDA if visible)")


def _add_advanced(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("advanced")
    group.add_argument("--kinds", nargs="+", default=[k.value for k in DEFAULT_QUANTIZED_KINDS],
                       choices=[k.value for k in GroupKind], metavar="KIND", help="group kinds to measure")
    group.add_argument("--group-size", type=int, default=None, choices=SUPPORTED_GROUP_SIZES,
                       help="quantizer group size: one table at this size (default: GPTQ at 64, 32 and 128, see "
                            "--options)")
    group.add_argument("--asym", action="store_true", help="asymmetric quantization")
    group.add_argument("--method", default=QuantSettings.method, choices=quantizer_names(),
                       help=f"quantizer (default {QuantSettings.method})")
    group.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=QuantSettings.clip_search,
                       help="per-group MSE clipping search instead of sign-aware absmax scales (default off)")
    group.add_argument("--options", nargs="*", default=None, metavar="FAMILY",
                       help="measure a table over options: one table per family, e.g. rtn-g32 rtn-g128 gptq-g64, "
                            "on the same tokens (default gptq-g64 gptq-g32 gptq-g128, RTN at those sizes where GPTQ "
                            "cannot run, unless --method, --group-size or --storage is given; no family: one table; "
                            "`mixprec search --options` reads them together)")
    group.add_argument("--no-quantize", action="store_true",
                       help="fail instead of quantizing missing variants")
    group.add_argument("--storage", default=None, metavar="URL",
                       help="Optuna storage URL or journal file path (default: journal.log in the measure folder)")
    group.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    group.add_argument("--reset-stale", action="store_true",
                       help="treat RUNNING jobs of workers on other hosts as dead and measure them again")
    group.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    group.add_argument("--batch-jobs", type=int, default=6, help="jobs claimed and batched together (default 6)")
    group.add_argument("--batch-windows", type=int, default=8, help="windows per forward chunk (default 8)")
    group.add_argument("--cache-mib", type=float, default=256.0,
                       help="memory for cached hidden states and batched candidates, MiB (default 256)")
    group.add_argument("--streaming", choices=STREAMING_MODES, default="auto",
                       help="read each layer's weights from the checkpoint only while it runs (on), load the whole "
                            "model (off), or stream when the fp32 model exceeds half of --max-memory (default auto)")
    group.add_argument("--max-memory", default=None, metavar="SIZE", type=parse_size,
                       help="memory budget, e.g. 24GB (default: the RAM / VRAM available at start)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("measure", help="measure the KL damage of every group at every bit width",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_basic(parser)
    _add_advanced(parser)
    add_calibration_arguments(parser, streaming=False)
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> MeasureConfig:
    """Validated configuration (raises MixprecError on bad values, before any model is loaded)."""
    resolve_granularity(args)
    resolve_options(args, 64)
    engine = EngineConfig(batch_windows=args.batch_windows, max_batch_windows=max(32, args.batch_windows),
                          prefix_cache_mib=args.cache_mib)
    return MeasureConfig(
        work=default_work_dir(args.model, args.work), model=args.model, mode=args.mode, bits=tuple(args.bits),
        base_bits=args.base_bits, granularity=args.granularity, kinds=tuple(args.kinds), num_windows=args.windows,
        seq_len=args.seq_len, data_files=tuple(args.data or ()),
        quant=QuantSettings(method=args.method, group_size=args.group_size, symmetric=not args.asym,
                            clip_search=args.clip_search),
        storage=args.storage, device=args.device,
        engine=engine, batch_jobs=args.batch_jobs, max_jobs=args.max_jobs, reset_stale=args.reset_stale,
        quantize_missing=not args.no_quantize, streaming=args.streaming, max_memory=args.max_memory,
    )


def configs_from_args(args: argparse.Namespace) -> list[MeasureConfig]:
    """One configuration per option family (`--options`), else the one of `config_from_args`."""
    config = config_from_args(args)
    if not args.options:
        return [config]
    return [replace(config, quant=family) for family in parse_families(args.options, config.quant)]


def run(args: argparse.Namespace) -> int:
    check_windows(args.model, args.seq_len)
    check_storage_arg(args.storage)
    configs = configs_from_args(args)
    if args.options and args.storage is not None:
        raise MixprecError("--options measures one table per family; give each its own --storage (run them one "
                           "by one with --method/--group-size) or leave --storage out")
    if not args.no_quantize:
        needed = [c.quant_config(b) for c in configs for b in c.variant_bits]
        quantize_calibrated(args, needed, configs[0].variant_kinds, configs[0].work)
    for config in configs:
        _measure_one(args, config)
    return 0


def _measure_one(args: argparse.Namespace, config: MeasureConfig) -> int:
    """Measure (or resume) one table and print it; 1 when other workers still hold jobs of it."""
    folder = run_measure(config, workers=args.workers)
    if folder is None:
        print(f"measured this worker's share; other workers still hold jobs of {config.folder} "
              "(the last one writes the table; re-run this command to check or to take over stale jobs)")
        return 1
    measurement = load_measurement(folder)
    rows = format_table(measurement)
    labels = {"drop": "KL(ref||q) with one group dropped",
              "split": "KL(ref||q) with one group dropped, experts' rows split from the fine table"}
    label = labels.get(config.mode) or (f"KL change raising one group from {config.base_bits} bits "
                                        f"(base KL {measurement.summary.base_kl:.3e})")
    print(f"{label}, mean ± se over {measurement.summary.data.num_windows} windows:")
    print_table(rows, list(rows[0]))
    summary = measurement.summary
    print(f"noise floor: repeat fp32 {summary.noise_floor_kl('repeat_fp32'):.1e}, "
          f"bf16 compute {summary.noise_floor_kl('bf16_compute'):.2e}")
    print(f"wrote {folder / 'table.csv'}, {folder / 'summary.json'}, {folder / 'measurement.json'}")
    return 0
