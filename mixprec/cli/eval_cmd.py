"""`mixprec eval DIR --reference MODEL`: llama.cpp-style KLD statistics of any checkpoint against a reference.

DIR is a `mixprec compile` output, a plain Hugging Face folder, or a GGUF file (run by llama.cpp itself,
through llama-cpp-python). The reference (default: the
bundled model) runs in fp32 on its held-out evaluation split (or on --data text files, tokenized
with its tokenizer). Prints mean KLD ± SE, median, p90, p99, p99.9, max, same-top-1 % ± SE,
RMS Δp ± SE, PPL of both and their log ratio, and KLD by reference confidence.

Usage:
    mixprec eval out/stdlib-moe-3bpw
    mixprec eval out/stdlib-moe-3bpw.gguf
    mixprec eval out/q --reference path/to/model --windows 64 --seq-len 512 --json out/q-eval.json

Basic:    DIR, --reference, --windows, --seq-len, --json
Advanced: --batch-size (windows per forward), --data FILE..., --split, --any-reference
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.checkpoint.evaluate import EvalConfig, evaluate, format_table, save_result
from mixprec.cli.checks import check_windows
from mixprec.model.streaming import STREAMING_MODES

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="KLD statistics of a checkpoint against a reference model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidate", type=Path, metavar="DIR",
                        help="compiled mixprec folder, plain HF folder or GGUF file")
    parser.add_argument("--reference", default=None, metavar="MODEL",
                        help="unquantized reference model folder (default: the bundled stdlib MoE)")
    parser.add_argument("--windows", type=int, default=32, metavar="N", help="evaluation windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, metavar="T", help="tokens per window (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="windows per forward pass (default 4)")
    parser.add_argument("--split", default="evaluation", help="token split of the reference folder (default "
                        "evaluation: held out from calibration and search)")
    parser.add_argument("--data", type=Path, nargs="+", default=None, metavar="FILE",
                        help="text files to evaluate on instead of the reference folder's split")
    parser.add_argument("--streaming", choices=STREAMING_MODES, default="auto",
                        help="read the fp32 reference (and a plain candidate) one layer at a time (on), whole (off), "
                             "or stream when the fp32 model exceeds half of the free RAM (default auto)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--any-reference", action="store_true",
                        help="allow a reference other than the model the checkpoint was compiled from")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_windows(args.reference, args.seq_len)
    config = EvalConfig(seq_len=args.seq_len, num_windows=args.windows, batch_size=args.batch_size,
                        split=args.split, streaming=args.streaming)
    result = evaluate(args.candidate, args.reference, config, args.data, args.any_reference)
    print(format_table(result))
    print(f"timings (s): {', '.join(f'{k} {v:.1f}' for k, v in result.timings.items())}")
    if args.json is not None:
        save_result(result, args.json)
        print(f"wrote {args.json}")
    return 0
