"""`mixprec report [MODEL] --work DIR`: an HTML report with PNG figures and a Markdown summary.

Reads what the stages left in the work folder (variants, the sensitivity measurement, the recipes
in WORK/recipes/ and their Optuna studies) and writes WORK/report/: index.html, summary.md,
report.json and figures/*.png (sensitivity heatmap, Pareto front with greedy / --hq / uniform,
the recipes' bit maps, predicted vs measured KL, measurement uncertainty). The figures and summary
are also attached to each recipe's study, so `mixprec dashboard` shows them.

Basic:
    mixprec report
    mixprec report --work work/stdlib-moe --recipe recipes/stdlib-moe-3bpw.yaml
    mixprec report path/to/model --out reports/mymodel

Advanced:
    --no-studies     do not read Optuna studies (the predicted-vs-measured plot then shows only
                     the recipes' held-out comparison)
    --no-attach      read the studies but do not upload the report into them
    --dpi N          figure resolution (default 110)
    --studies-dir DIR...  folders whose study storages a recipe may name (default ./studies, where
                     `mixprec search` keeps them); the work folder is always allowed. A recipe naming a
                     storage anywhere else is left out with a warning: the report never reads or writes
                     where a recipe file tells it
    --storage URL...      study storages to read and attach to, e.g. a database server the studies live on
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.cli.checks import check_storage_arg
from mixprec.cli.common import add_model_argument, add_work_argument, default_work_dir
from mixprec.report import build_report
from mixprec.report.collect import StudyAccess

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write an HTML/Markdown report with figures of a work folder",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    add_work_argument(parser)
    parser.add_argument("--recipe", type=Path, nargs="+", default=[], metavar="FILE",
                        help="extra recipe YAML files (WORK/recipes/*.yaml are always included)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="report folder (default WORK/report)")
    group = parser.add_argument_group("advanced")
    group.add_argument("--no-studies", action="store_true", help="do not read the Optuna studies")
    group.add_argument("--no-attach", action="store_true", help="do not attach the report to the studies")
    group.add_argument("--dpi", type=int, default=110, help="figure resolution (default 110)")
    group.add_argument("--studies-dir", type=Path, nargs="+", default=[Path("studies")], metavar="DIR",
                       help="folders whose study storages recipes may name (default ./studies)")
    group.add_argument("--storage", nargs="+", default=[], metavar="URL",
                       help="study storages to read and attach to (e.g. a database server)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for url in args.storage:
        check_storage_arg(url)
    work = default_work_dir(args.model, args.work)
    page = build_report(work, tuple(args.recipe), args.out, studies=not args.no_studies,
                        attach=not args.no_attach, dpi=args.dpi,
                        access=StudyAccess(tuple(args.studies_dir), tuple(args.storage)))
    print(f"wrote {page} and {page.parent / 'summary.md'}")
    return 0
