"""Arguments shared by several stages, so every stage spells them the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.model.loading import resolve_model_path

__all__ = ["add_model_argument", "add_work_argument", "default_work_dir", "print_table"]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="local Hugging Face model folder (default: the bundled stdlib MoE)")


def add_work_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="work folder shared by the stages (default: ./work/<model folder name>)")


def default_work_dir(model: str | None, work: Path | None) -> Path:
    """`--work` if given, else `./work/<name of the model folder>`."""
    return work if work is not None else Path("work") / resolve_model_path(model).name


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    """Print rows as an aligned plain-text table (stdout is for results; logs go to stderr)."""
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w) for v, w in zip(r, widths, strict=True)))
