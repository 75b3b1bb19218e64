"""Input checks every command runs on its arguments before any work: one line naming the flag and the fix.

A stage that fails after ten minutes of quantizing on a value the parser already held wastes the user's
time, so each command's `run` calls these first: numbers finite and in range, paths of the right kind,
windows within the model's positions. The stages keep their own checks (they are also a library); these
only move the failure to the start.
"""

from __future__ import annotations

import argparse
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import nearest_existing
from mixprec.core.storage_url import check_storage, describe_open_error, storage_path
from mixprec.model.data import check_seq_len
from mixprec.model.loading import resolve_model_path

__all__ = ["check_args", "check_windows", "check_port", "check_storage_arg", "check_out_file", "is_recipe_file",
           "is_override_file"]


#: Flags naming input files that must exist as regular files (a folder gave IsADirectoryError mid-run).
INPUT_FILE_FLAGS = {"data": "--data", "eval_data": "--eval-data", "calib_data": "--calib-data", "recipe": "RECIPE"}
#: Flags naming output files: they may not be folders.
OUTPUT_FILE_FLAGS = {"json": "--json"}


def _check_numbers(args: argparse.Namespace) -> None:
    """Every float argument finite: nan and inf (and 1e400, which is inf) pass argparse's float()."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                flag = "--" + dest.replace("_", "-")
                raise MixprecError(f"{flag} {item} is not a finite number; give a value such as "
                                   f"{flag} 3.0")


def _check_inputs(args: argparse.Namespace) -> None:
    for dest, flag in INPUT_FILE_FLAGS.items():
        value = getattr(args, dest, None)
        for path in value if isinstance(value, list | tuple) else [value]:
            if path is None:
                continue
            if not Path(path).exists():
                raise MixprecError(f"{flag} {path} does not exist")
            if not Path(path).is_file():
                example = f"{path}/*.yaml" if dest == "recipe" else f"{path}/*.txt"
                raise MixprecError(f"{flag} {path} is a folder; give the file(s) inside it (e.g. {example})")


def _check_outputs(args: argparse.Namespace) -> None:
    for dest, flag in OUTPUT_FILE_FLAGS.items():
        path = getattr(args, dest, None)
        if isinstance(path, Path):
            check_out_file(path, flag, lambda _: True)
    work = getattr(args, "work", None)
    if isinstance(work, Path) and work.exists() and not work.is_dir():
        raise MixprecError(f"--work {work} is a file; give the work folder (it is created if missing)")


def check_args(args: argparse.Namespace) -> None:
    """The checks every command gets before it runs: finite numbers, input files that are files, output
    paths that are not folders, a work folder that is not a file."""
    _check_numbers(args)
    _check_inputs(args)
    _check_outputs(args)


def check_port(host: str, port: int) -> None:
    """A port in range that nothing listens on yet (the server would otherwise fail after start-up)."""
    if not 1 <= port <= 65535:
        raise MixprecError(f"--port {port} is out of range; use 1..65535 (e.g. --port 8080)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise MixprecError(f"--port {port} on {host} is not free ({exc.strerror}); pick another with "
                               "--port") from exc


def check_windows(model: str | None, seq_len: int, flag: str = "--seq-len") -> None:
    """`seq_len` within the model's `max_position_embeddings` (and at least 2)."""
    if seq_len < 2:
        raise MixprecError(f"{flag} {seq_len} is too short; a window needs at least 2 tokens (e.g. {flag} 256)")
    check_seq_len(resolve_model_path(model), seq_len, flag)


def check_storage_arg(url: str | None, flag: str = "--storage") -> None:
    """A supported storage form (`mixprec.core.storage_url`) and, for a database server, one that answers:
    an unreachable server fails here, not after the variants were quantized."""
    if url is None:
        return
    check_storage(url, flag)
    if storage_path(url) is not None:
        return
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(url, poolclass=NullPool)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # driver / network / authentication errors
        raise describe_open_error(url, exc, flag) from exc


def _yaml_mapping(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def is_recipe_file(path: Path) -> bool:
    """A recipe mixprec wrote (`kind: mixprec.recipe`), which a new search may replace."""
    data = _yaml_mapping(path)
    return data is not None and data.get("kind") == "mixprec.recipe"


def is_override_file(path: Path) -> bool:
    """An exllamav3 override YAML (`sources` + `overrides`), which a new export may replace."""
    data = _yaml_mapping(path)
    return data is not None and {"sources", "overrides"} <= set(data)


def check_out_file(path: Path | None, flag: str, ours: Callable[[Path], bool], force: bool = False) -> None:
    """An output file path that can be written: not a folder, its folder creatable, and no existing file
    replaced unless it is one of ours (`ours`) or `force` is given."""
    if path is None:
        return
    if path.is_dir():
        raise MixprecError(f"{flag} {path} is a folder; give a file path")
    ancestor = nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise MixprecError(f"{flag} {path}: {ancestor} is not a folder, so the file cannot be written")
    if path.exists() and not force and not ours(path):
        raise MixprecError(f"{flag} {path} exists and is not a file mixprec wrote; it would be overwritten: "
                           "choose another path or pass --force")
