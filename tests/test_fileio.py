"""Atomic writes: the result is what a plain write would give (mode under the umask), never a torn file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixprec.core.fileio import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, nearest_existing


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a given umask and restore the caller's afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_mode_plain_open_gives(tmp_path: Path, umask: int) -> None:
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"x")
    expected = _mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    for name in ("a.txt", "b.json", "c.bin"):
        assert _mode(tmp_path / name) == expected, f"{name}: {oct(_mode(tmp_path / name))} != {oct(expected)}"


def test_atomic_folders_get_the_mode_plain_mkdir_gives(tmp_path: Path, umask: int) -> None:
    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        atomic_write_text(tmp / "inner.txt", "x")
    assert _mode(tmp_path / "out") == _mode(tmp_path / "plain") == 0o777 & ~umask
    assert _mode(tmp_path / "out" / "inner.txt") == 0o666 & ~umask


def test_failed_block_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """kill -9 mid-write leaves `.out.HOST-PID-X.tmp` (on a large model, gigabytes); the next write of the same
    target removes it, while a live writer's and other hosts' temporaries are kept."""
    import signal
    import subprocess
    import sys

    from mixprec.core import fileio

    code = ("import sys, time; from mixprec.core.fileio import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'shard').write_bytes(b'x' * 1000); print('ready', flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".tmp"), left
    live = tmp_path / f".out.{fileio._host()}-{os.getpid()}-0123abcd.tmp"
    other_host = tmp_path / f".out.elsewhere-{child.pid}-0123abcd.tmp"
    live.mkdir()
    other_host.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "shard").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other_host.name])


def test_nearest_existing_is_where_creating_folders_would_start(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    assert nearest_existing(tmp_path / "a" / "b" / "c.db") == tmp_path / "a"
    assert nearest_existing(tmp_path / "a") == tmp_path / "a"
    assert nearest_existing(tmp_path / "f" / "x" / "y") == tmp_path / "f"  # a file: the caller refuses it
