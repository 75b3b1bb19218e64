"""Input checks every command runs on its arguments before any work: one line naming the flag and the fix.

A stage that fails after ten minutes of quantizing on a value the parser already held wastes the user's
time, so each command's `run` calls these first: numbers finite and in range, paths of the right kind,
windows within the model's positions. The stages keep their own checks (they are also a library); these
only move the failure to the start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.storage_url import check_storage, describe_open_error, storage_path
from mixprec.model.data import check_seq_len
from mixprec.model.loading import resolve_model_path

__all__ = ["check_windows", "check_storage_arg", "check_out_file", "is_recipe_file", "is_override_file"]


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
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MixprecError(f"{flag} {path}: {ancestor} is not a folder, so the file cannot be written")
    if path.exists() and not force and not ours(path):
        raise MixprecError(f"{flag} {path} exists and is not a file mixprec wrote; it would be overwritten: "
                           "choose another path or pass --force")
