"""Repair of an Optuna journal file after a crash mid-write (power loss, full disk, kill -9 during a write).

Optuna appends one JSON record per line. A torn last record is harmless to readers, but the next append
lands on the same line and from then on every run dies with a JSON decode error. `repair_journal` runs
before a journal is opened: under Optuna's own journal lock (so no live writer is mid-append) it keeps
every complete record, drops the torn bytes (a record that never finished writing never happened), and,
for a file an older run already appended onto, splits the record that starts inside a damaged line back
out. It logs what it dropped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["repair_journal"]

log = logging.getLogger(__name__)

#: Every Optuna journal record starts with its operation code.
_RECORD_START = b'{"op_code"'


def _complete(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _repaired_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete records of `data`, and how many bytes were dropped."""
    kept: list[bytes] = []
    dropped = 0
    for line in data.split(b"\n"):
        if not line or _complete(line):
            kept.extend([line] if line else [])
            continue
        start = line.rfind(_RECORD_START)
        if start > 0 and _complete(line[start:]):  # a torn record with a whole one appended onto it
            kept.append(line[start:])
            dropped += start
        else:
            dropped += len(line)
    return kept, dropped


def repair_journal(path: str | os.PathLike[str]) -> int:
    """Drop torn records from the journal at `path` (if any); returns the number of bytes dropped."""
    from optuna.storages.journal import JournalFileSymlinkLock

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        if data.endswith(b"\n") and all(_complete(line) for line in data.splitlines() if line):
            return 0
        kept, dropped = _repaired_lines(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.repair.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    finally:
        lock.release()
    log.warning("%s: dropped %d bytes of torn journal records left by an interrupted write; kept %d complete "
                "records", path, dropped, len(kept))
    return dropped
