"""The one place an Optuna storage is opened, for the measure job store, the search study and the report.

Every stage accepts the same storage forms: a plain path (an Optuna journal file, safe for several
processes on one host through file locks), or an Optuna storage URL (`sqlite:///x.db`, an RDB server
such as `postgresql://...`, shared by machines). Writers create the folder a file-based storage needs;
readers (the report, the dashboard) open an existing SQLite database without creating or migrating
tables, as optuna-dashboard does, so reading never changes what it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.journal import repair_journal
from mixprec.core.storage_url import check_storage, describe_open_error

__all__ = ["JOURNAL_FILE", "open_storage"]

#: the journal file a stage keeps in its own folder when no storage is given
JOURNAL_FILE = "journal.log"


def _journal(path: Path, create: bool) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)  # a torn last record would make the next append unreadable
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_storage(url: str | None, folder: Path | None = None, create: bool = True) -> Any:
    """An Optuna storage for `url`: a journal file path, or any Optuna storage URL.

    `url=None` means the stage's own journal, `folder/journal.log`. With `create=False` nothing is
    created: a SQLite database is opened read-only in spirit (no table creation, no schema check).
    A writer's URL is checked first (`mixprec.core.storage_url.check_storage`), and a storage that cannot
    be opened (server down, wrong password) is a one-line `StorageError`, not a driver traceback.
    """
    if url is None:
        if folder is None:
            raise ValueError("open_storage needs a folder when no storage URL is given")
        return _journal(Path(folder) / JOURNAL_FILE, create)
    if create:
        check_storage(url)
    try:
        return _open_url(url, create)
    except MixprecError:
        raise
    except Exception as exc:  # sqlalchemy / driver / OS errors
        raise describe_open_error(url, exc) from exc


def _open_url(url: str, create: bool) -> Any:
    import optuna

    if "://" not in url:
        return _journal(Path(url), create)
    if url.startswith("sqlite:///"):
        if not create:
            return optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.get_storage(url)
