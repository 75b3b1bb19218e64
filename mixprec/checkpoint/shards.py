"""Hugging Face sharded safetensors: header reading and validation, shard planning, the index file.

A checkpoint is either one `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
`model.safetensors.index.json` (`{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}`,
keys sorted, as transformers writes it; FIELD.md §5.6). Headers are parsed here directly (8-byte
little-endian length, then JSON) rather than through `safe_open`, because planning and verification
need exact byte sizes and the `__metadata__` map without reading any tensor data, and because a
truncated or corrupt file should be reported with the file name and what exactly is wrong.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mixprec.core.errors import MixprecError, ModelLoadError
from mixprec.core.fileio import atomic_write_json, read_json

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "TensorInfo",
    "ShardHeader",
    "read_header",
    "shard_names",
    "plan_shards",
    "write_index",
    "checkpoint_shards",
    "parse_size",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

T = TypeVar("T")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    """A validated safetensors header: tensors in file order, the str->str metadata, and the file size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_bytes: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _corrupt(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a valid safetensors file: {what}; the file is truncated or corrupt, "
                          "re-create or re-copy it")


def _parse_entries(path: Path, raw: dict[str, object], data_len: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _corrupt(path, f"header entry {name!r} lacks dtype/shape/data_offsets")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise _corrupt(path, f"tensor {name!r} spans bytes {start}..{end} but the data section holds {data_len}")
        tensors[name] = TensorInfo(name, str(entry["dtype"]), tuple(int(s) for s in entry["shape"]), end - start)
        end_max = max(end_max, end)
    if end_max != data_len:
        raise _corrupt(path, f"the header covers {end_max} data bytes but the file holds {data_len}")
    return tensors


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate a safetensors header without reading tensor data.

    Checks that the header is JSON of the right shape and that the tensors exactly cover the file,
    which is what catches truncated, padded or overwritten files.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes long")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header length {length} exceeds the file size {size}")
        try:
            raw = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _corrupt(path, f"the header is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    return ShardHeader(path, _parse_entries(path, raw, size - 8 - length), metadata, size)


def shard_names(count: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-0000i-of-0000N.safetensors` (transformers' names)."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(items: Sequence[tuple[T, int]], max_bytes: int) -> list[list[T]]:
    """Split (item, bytes) pairs, in order, into shards of at most `max_bytes`.

    An item larger than the limit gets a shard of its own (a tensor is never split), as transformers does.
    """
    if max_bytes <= 0:
        raise MixprecError(f"max shard size must be positive, got {max_bytes} bytes")
    shards: list[list[T]] = [[]]
    used = 0
    for item, nbytes in items:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += nbytes
    return shards if shards[0] else []


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write `model.safetensors.index.json` with sorted keys (total_size = tensor data bytes)."""
    atomic_write_json(folder / INDEX_FILE, {"metadata": {"total_size": total_size},
                                            "weight_map": dict(sorted(weight_map.items()))})


def _index_files(folder: Path, index: Path) -> list[Path]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no 'weight_map'; it is not a safetensors index")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    headers = {f.name: read_header(f) for f in files}
    for name, header in headers.items():
        listed = {k for k, v in weight_map.items() if v == name}
        if listed != set(header.tensors):
            odd = sorted(listed ^ set(header.tensors))[:3]
            raise ModelLoadError(f"{index} and {header.path} disagree on which tensors the shard holds "
                                 f"(e.g. {odd}); the index or the shard is stale or corrupt")
    total = data.get("metadata", {}).get("total_size")
    actual = sum(h.data_bytes for h in headers.values())
    if total is not None and int(total) != actual:
        raise ModelLoadError(f"{index}: metadata.total_size is {total} but the shards hold {actual} tensor bytes")
    return files


def checkpoint_shards(folder: str | Path) -> list[ShardHeader]:
    """Validated headers of a folder's weight files (index shards, or the single model.safetensors)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        return [read_header(f) for f in _index_files(folder, index)]
    if (folder / SINGLE_FILE).exists():
        return [read_header(folder / SINGLE_FILE)]
    raise ModelLoadError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def parse_size(text: str | int) -> int:
    """Bytes from `"2GB"`, `"500MiB"`, `"64KB"` or a plain number (decimal units as transformers; KiB etc. binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise MixprecError(f"size {text!r} is not understood; write e.g. 2GB, 500MB, 64KiB or a byte count")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise MixprecError(f"size {text!r} must be positive")
    return value
