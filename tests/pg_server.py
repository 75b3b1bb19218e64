"""A throwaway PostgreSQL server for the scale-out tests: initdb into a temporary folder, start, stop, delete.

Why not pytest-postgresql: PostgreSQL refuses to run as root, and CI runs as root, so the server has to be
started as another user (Debian's package creates `postgres`) with a data folder that user owns; a short
script that does exactly that is clearer than configuring a fixture factory around it.

Where the binaries come from: Debian's `postgresql` package (runs/setup.sh installs it where apt-get
exists) puts them in /usr/lib/postgresql/<version>/bin, off the PATH. Without them the test fails when
`CI` is set (CI must run it) and skips cleanly on a machine without apt-get (nothing could install them).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["postgres_bin", "postgres_server"]

_USER = "mixprec"


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (newest Debian version first, then the PATH), or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(folder, "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_server_user(folder: Path) -> list[str]:
    """Command prefix that runs as a non-root user (root: Debian's `postgres`), owning `folder`."""
    if os.geteuid() != 0:
        return []
    account = pwd.getpwnam("postgres")
    os.chown(folder, account.pw_uid, account.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Start a fresh server on a free localhost port; yields its SQLAlchemy URL (psycopg 3 driver)."""
    folder = Path(tempfile.mkdtemp(prefix="mixprec-pg-"))
    os.chmod(folder, 0o700)
    data, port = folder / "data", _free_port()
    prefix = _as_server_user(folder)
    run = dict(check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    try:
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", _USER, "-A", "trust",
                        "--no-sync"], **run)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                        str(folder / "server.log"), "-w", "start"], **run)
        try:
            yield f"postgresql+psycopg://{_USER}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           check=False, capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
