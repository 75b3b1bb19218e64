"""Atomic file writes and content hashing shared by every stage.

Stages hand off through files, so a crash must never leave a half-written file that a later run
mistakes for a finished one: everything is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "clean_stale_temps",
    "nearest_existing",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "atomic_dir",
    "sha256_file",
    "sha256_text",
    "read_json",
    "parse_yaml",
    "read_yaml",
    "dump_yaml",
]


log = logging.getLogger(__name__)

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(target: str | os.PathLike[str]) -> int:
    """Remove temporaries of `target` left by dead processes of this host (kill -9 or power loss mid-write:
    on a large model a whole checkpoint or variant folder); returns how many were removed.

    Only names this module makes (`.NAME.HOST-PID-RANDOM.tmp`) whose host is this one and whose pid no longer
    runs are touched: a live writer's temporary, or one of another machine sharing the folder, is kept.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}\.tmp$")
    removed = 0
    if not target.parent.is_dir():
        return 0
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _owner_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.warning("removed %s, left by a stopped process (pid %s)", entry, match.group(1))
        removed += 1
    return removed


def _create_temp(target: Path, make: Callable[[Path], None]) -> Path:
    """Create a fresh `.NAME.HOST-PID-RANDOM.tmp` sibling of `target` with `make`, retrying on a name clash.

    The owner's host and pid in the name let a later run tell a dead run's leftovers from a live one's; the
    dead ones are removed first (`clean_stale_temps`).
    """
    clean_stale_temps(target)
    while True:
        tmp = target.parent / f".{target.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    # Note: not tempfile.mkstemp, which creates 0600: mode 0666 here lets the umask decide, as plain open() does,
    # so a serving process or a worker under another uid can read what we write.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_dir(path: Path) -> None:
    path.mkdir(mode=0o777)  # the umask decides (tempfile.mkdtemp would make it owner-only 0700)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only if the block succeeds.

    The file gets the mode a plain `open()` would give under the caller's umask.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target, _new_file)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; it replaces `target` only if the block succeeds.

    A failure removes the temporary directory, so no half-written output folder is ever left behind. The
    folder gets the mode a plain `mkdir` would give under the caller's umask.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target, _new_dir)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_with(target: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    with atomic_path(target) as tmp:
        write(tmp)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `target` atomically (UTF-8)."""
    _write_with(target, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON atomically."""
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a parse failure into an error that names the file."""
    from mixprec.core.errors import MixprecError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MixprecError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise MixprecError(f"{path} is a folder, not a JSON file") from exc
    except UnicodeDecodeError as exc:
        raise MixprecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); delete it and re-run "
                           "the stage") from exc
    except RecursionError as exc:
        raise MixprecError(f"{path}: JSON nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise MixprecError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage") from exc


def dump_yaml(data: Any, width: int = 120) -> str:
    """Block-style YAML in the dict's own key order (what recipes and override files are written as)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=width)


def _unique_key_loader() -> type:
    """A `yaml.SafeLoader` that refuses a mapping with a repeated key (plain YAML keeps the last silently, so
    `layers.0.attn.q: 4` written twice with different bits would apply whichever came last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str | int | float | bool) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                            key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def parse_yaml(text: str, where: str, error: type[Exception]) -> Any:
    """Safe YAML loading (`yaml.SafeLoader`, plus duplicate keys refused) with a failure raised as `error`
    naming `where` (a file or "recipe")."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise error(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from exc
    except RecursionError as exc:
        raise error(f"{where}: nested too deeply to be a mixprec file") from exc


def read_yaml(path: str | os.PathLike[str], what: str, error: type[Exception]) -> tuple[Any, str]:
    """Parse a YAML file (see `parse_yaml`); a missing file is `error` naming `what` it should be.
    Returns the data and the file name to quote in later errors."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if not path.is_file():
        raise error(f"{what} {path} is a folder; give the YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); is it a YAML file?") \
            from exc
    return parse_yaml(text, str(path), error), str(path)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large shards do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists: where creating the missing folders would start, so
    callers can tell before any work whether a file can be written there (it must be a folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
