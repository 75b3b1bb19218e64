"""Typed records read back from JSON: the key and schema checks every artifact dataclass shares.

Stages hand each other small JSON files (variant manifests, measurement summaries, measurement rows).
Their dataclasses build themselves from the parsed JSON with `from_dict`; these helpers make the
mapping's keys match the dataclass and its schema version match the reader, so a file written by
another version or edited by hand fails with one line naming the file and the fix, not a KeyError
deep inside a later stage.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from mixprec.core.errors import MixprecError

__all__ = ["check_schema", "record_fields", "drop_none"]


def check_schema(data: Any, version: int, where: str, error: type[MixprecError], fix: str) -> None:
    """Refuse a file whose `schema_version` is not the one this mixprec reads and writes."""
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != version:
        raise error(f"{where}: schema_version {found} is not {version}; {fix}")


def record_fields(data: Any, cls: type, where: str, error: type[MixprecError], fix: str) -> dict[str, Any]:
    """`data` as a mapping with only the fields of dataclass `cls` and all of its required ones."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}; {fix}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    missing = sorted(name for name, f in known.items()
                     if name not in data and f.default is MISSING and f.default_factory is MISSING)
    problems = ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])
    if problems:
        raise error(f"{where}: {' and '.join(problems)}; {fix}")
    return data


def drop_none(values: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    """`values` without the optional keys that are None, so files without them round-trip unchanged."""
    return {k: v for k, v in values.items() if not (k in optional and v is None)}
