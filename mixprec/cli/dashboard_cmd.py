"""`mixprec dashboard`: serve the Optuna studies of `mixprec search` with optuna-dashboard.

Opens the study database (default: the only `*.db` in ./studies, or studies/NAME.db with --study)
and serves it on http://127.0.0.1:8080/ until Ctrl-C. Each trial's recipe YAML (attached by the
search) and the report's figures and summary (attached by `mixprec report`) open from the study
and trial pages; the artifact folder defaults to `artifacts/` next to the study database.

Basic:
    mixprec dashboard
    mixprec dashboard --study stdlib-moe-fine-3bpw-s0
    mixprec dashboard --storage sqlite:///work/demo/studies/stdlib-moe-fine-3bpw-s0.db --port 8081

Advanced:
    --host 0.0.0.0        serve other machines too (the dashboard has no authentication)
    --artifact-dir DIR    artifact folder when it is not next to the database
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.cli.checks import check_port, check_storage_arg
from mixprec.report.dashboard import DashboardConfig, find_storage, serve, study_urls

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dashboard", help="serve the Optuna studies with optuna-dashboard",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=None, metavar="NAME", help="study database studies/NAME.db")
    parser.add_argument("--storage", default=None, metavar="URL", help="Optuna storage URL or journal file path")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    group = parser.add_argument_group("advanced")
    group.add_argument("--studies-dir", type=Path, default=Path("studies"),
                       help="where --study NAME is looked up (default ./studies)")
    group.add_argument("--artifact-dir", type=Path, default=None, metavar="DIR",
                       help="artifact folder (default: artifacts/ next to the study database)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_storage_arg(args.storage)
    check_port(args.host, args.port)
    storage = find_storage(args.study, args.storage, args.studies_dir)
    config = DashboardConfig(storage, args.host, args.port, args.artifact_dir)
    for name, url in study_urls(config).items():
        print(f"study {name}: {url}", flush=True)
    print(f"serving {storage} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    serve(config)
    return 0
