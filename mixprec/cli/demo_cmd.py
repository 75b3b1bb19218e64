"""`mixprec demo`: the whole pipeline on the bundled model, ending with a summary table.

quantize (2 3 4 5 6 8 bits at group sizes 64, 32 and 128) -> measure (drop-one KL per group and option)
-> search (each group's width and group size chosen jointly; one Optuna study per budget, seeded with
the exact DP solution and the baselines) -> compile (packed checkpoint per budget) ->
eval (held-out KL of the compiled checkpoint) -> GGUF (each recipe's widths as ggml K-quants, written
as a GGUF and scored by llama.cpp itself; skipped with one line without llama-cpp-python) -> report
(HTML + PNG figures). About five minutes on two CPU cores; everything lands in --work (default
work/demo) and finished stages are reused.

Usage:
    mixprec demo
    mixprec demo --budgets 3.0 --trials 20 --work work/demo3
    mixprec demo --options            # one group size (RTN g64), widths only
    mixprec demo --granularity expert --mode split   # a width per routed expert (mixprec's format, not GGUF)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.cli.checks import check_windows
from mixprec.cli.common import add_model_argument, print_table
from mixprec.cli.demo import DemoConfig, gguf_note, run_demo, summary_rows
from mixprec.model.modelmap import Granularity
from mixprec.search.study import quiet_optuna

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on the bundled model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    defaults = DemoConfig()
    parser.add_argument("--work", type=Path, default=defaults.work, metavar="DIR", help="work folder")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(defaults.budgets), metavar="BPW",
                        help="bit budgets to search (default 2.5 3.0 3.5 4.0)")
    parser.add_argument("--granularity", choices=[g.value for g in Granularity], default=defaults.granularity,
                        help="group granularity measured and searched (default fine)")
    parser.add_argument("--mode", choices=["drop", "split"], default=defaults.mode,
                        help="split (with --granularity expert): per-expert widths from the fine table; GGUF holds "
                             "one type per layer and projection, so the llama.cpp step is skipped for such recipes")
    parser.add_argument("--trials", type=int, default=defaults.trials, help="real-KL trials per budget")
    parser.add_argument("--bits", type=int, nargs="+", default=list(defaults.bits), metavar="B",
                        help="uniform variants to build and measure (default 2 3 4 5 6 8)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window (default 256)")
    parser.add_argument("--measure-windows", type=int, default=defaults.measure_windows,
                        help="calibration windows for measurement and search")
    parser.add_argument("--eval-windows", type=int, default=defaults.eval_windows, help="held-out windows")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--options", nargs="*", default=list(defaults.options), metavar="FAMILY",
                        help="option families each group chooses among jointly (default rtn-g64 rtn-g32 "
                             "rtn-g128: width and group size per group; greedy and --hq use the first); "
                             "give none for one group size, widths only")
    parser.add_argument("--no-gguf", action="store_true",
                        help="skip the GGUF stage (each recipe written as a GGUF and scored in llama.cpp)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_windows(args.model, args.seq_len)
    config = DemoConfig(work=args.work, model=args.model, bits=tuple(args.bits), budgets=tuple(args.budgets),
                        seq_len=args.seq_len,
                        granularity=args.granularity, mode=args.mode, trials=args.trials,
                        measure_windows=args.measure_windows,
                        eval_windows=args.eval_windows, device=args.device, report=not args.no_report,
                        gguf=not args.no_gguf, options=tuple(args.options))
    if not args.verbose:
        quiet_optuna()
    results = run_demo(config)
    print("\nheld-out KL(ref||q) on the evaluation split (uniform = nearest uniform variant at or above the budget)")
    rows = summary_rows(results)
    print_table(rows, list(rows[0]))
    note = gguf_note(results)
    if note:
        print(note)
    print(f"\nwork folder: {config.work}   report: {config.work / 'report' / 'index.html'}")
    return 0
