"""Checks of an Optuna storage given on the command line (`--storage`), before anything is opened or written.

A storage is either a database URL for Optuna's RDB storage (SQLAlchemy: `sqlite:///FILE.db`,
`postgresql://USER@HOST/DB`, `mysql+pymysql://USER@HOST/DB`) or the path of an Optuna journal file
ending in `.log`. Everything else is refused with one line naming the supported forms: a typo such
as `sqlite:/x.db` or `not a url` must not silently become a journal file in the current folder, and an
unsupported scheme or a missing database driver must not surface as a traceback from deep inside
SQLAlchemy. Reachability is checked where the storage is opened (`describe_open_error`).
"""

from __future__ import annotations

import re
from pathlib import Path

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import nearest_existing

__all__ = ["StorageError", "RDB_SCHEMES", "JOURNAL_SUFFIX", "check_storage", "storage_path", "redact",
           "describe_open_error"]

#: Database families Optuna's RDB storage supports through SQLAlchemy (a driver may follow: postgresql+psycopg).
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
#: The suffix a journal file path must carry, so a typo is never mistaken for one.
JOURNAL_SUFFIX = ".log"

_FORMS = ("sqlite:///FILE.db, postgresql://USER@HOST/DB, mysql+pymysql://USER@HOST/DB, or a journal file path "
          f"ending in {JOURNAL_SUFFIX}")
_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class StorageError(MixprecError):
    """A `--storage` value that is not a supported, usable Optuna storage."""


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def _check_folder(path: Path, flag: str, url: str) -> None:
    """The file's folder exists or can be made: its nearest existing ancestor is a folder, the path no folder."""
    if path.is_dir():
        raise StorageError(f"{flag} {url}: {path} is a folder; name a file in it")
    ancestor = nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise StorageError(f"{flag} {url}: {ancestor} is not a folder, so {path} cannot be created")


def _check_rdb(url: str, flag: str) -> None:
    from sqlalchemy.engine import make_url

    scheme = url.split("://", 1)[0]
    if scheme.split("+", 1)[0].lower() not in RDB_SCHEMES:
        raise StorageError(f"{flag} {redact(url)}: scheme {scheme!r} is not an Optuna storage; use {_FORMS}")
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except Exception as exc:  # ArgumentError / NoSuchModuleError: a malformed URL or an unknown driver
        raise StorageError(f"{flag} {redact(url)} is not a valid database URL ({exc}); use {_FORMS}") from exc
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StorageError(f"{flag} {redact(url)}: the database driver for {scheme!r} is not installed ({exc}); "
                           "install it (PostgreSQL: pip install 'mixprec[postgres]') or name another "
                           "driver in the URL (e.g. mysql+pymysql://)") from exc
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StorageError(f"{flag} {url}: an in-memory SQLite database is not shared or kept; "
                               "use sqlite:///FILE.db")
        _check_folder(Path(parsed.database), flag, url)


def check_storage(url: str, flag: str = "--storage") -> None:
    """Raise `StorageError` (one line: the value, what is wrong, the supported forms) unless `url` is usable."""
    if not url.strip():
        raise StorageError(f"{flag} is empty; use {_FORMS}")
    if "://" in url:
        _check_rdb(url, flag)
        return
    if _SCHEME_LIKE.match(url):
        raise StorageError(f"{flag} {url} looks like a URL but has no '//' after the scheme (e.g. sqlite:///x.db "
                           f"has three slashes); use {_FORMS}")
    if not url.endswith(JOURNAL_SUFFIX):
        raise StorageError(f"{flag} {url!r} is neither a storage URL nor a journal file path ending in "
                           f"{JOURNAL_SUFFIX}; use {_FORMS}")
    _check_folder(Path(url), flag, url)


def storage_path(url: str) -> Path | None:
    """The local file behind a storage (a journal path or sqlite:///FILE), None for a database server."""
    if "://" not in url:
        return Path(url)
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def describe_open_error(url: str, exc: BaseException, flag: str = "--storage") -> StorageError:
    """A one-line error for a storage that passed `check_storage` but could not be opened (server down,
    wrong password, unreadable file)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return StorageError(f"cannot open {flag} {redact(url)} ({type(exc).__name__}: {first}); check that the "
                        "server is running and reachable and the credentials are right, or use a local "
                        "sqlite:///FILE.db or journal .log file")
