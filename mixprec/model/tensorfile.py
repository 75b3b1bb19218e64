"""Read tensors from a safetensors file through a read-only shared memory map.

Why not `safetensors.safe_open(path, "pt")`: for torch it maps the file copy-on-write (a private, writable
mapping, so tensors can be views into it). The kernel charges such a mapping to the process's data size
(RLIMIT_DATA) as if it were anonymous memory, and every page read stays resident in the process until the
file is closed. A shared read-only map is charged to the page cache instead, which the kernel drops under
pressure, and `get_tensor` copies only the tensor asked for. The format is simple enough to read directly:
an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from mixprec.core.errors import ModelLoadError

__all__ = ["TensorFile"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorFile:
    """One safetensors file, mapped read-only and shared; use as a context manager or call `close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            (length,) = struct.unpack("<Q", self._map[:8])
            header = json.loads(self._map[8 : 8 + length])
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"{self.path} is not a readable safetensors file ({exc}); re-download or "
                                 "re-save it") from exc
        self._start = 8 + length
        self._metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict[str, Any]] = header

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor (a copy, independent of the map) holding the stored values of `key`, converted to
        `dtype` on the way (one allocation: no stored-dtype temporary)."""
        stored = self.view(key)
        out = torch.empty(stored.shape, dtype=dtype or stored.dtype)
        return out.copy_(stored)

    def copy_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Write the stored values of `key` into `out` (same shape; converted to its dtype), allocating nothing."""
        return out.copy_(self.view(key))

    def view(self, key: str) -> torch.Tensor:
        """A read-only tensor over the mapped bytes of `key`: valid until `close`, never to be written."""
        try:
            entry = self._entries[key]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no tensor named {key!r}") from None
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']!r}, which mixprec cannot "
                                 f"read (known: {sorted(_DTYPES)})")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the map is read-only; callers copy out of it and never write to it
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._start + begin)
        return view.view(dtype).reshape(shape)

    def close(self) -> None:
        """Unmap the file (tensors already returned stay valid: they are copies)."""
        self._map.close()
