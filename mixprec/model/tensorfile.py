"""Read tensors from a safetensors file through a read-only shared memory map.

Why not `safetensors.safe_open(path, "pt")`: for torch it maps the file copy-on-write (a private, writable
mapping, so tensors can be views into it). The kernel charges such a mapping to the process's data size
(RLIMIT_DATA) as if it were anonymous memory, and every page read stays resident in the process until the
file is closed. A shared read-only map is charged to the page cache instead, which the kernel drops under
pressure, and `get_tensor` copies only the tensor asked for. The format is simple enough to read directly:
an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data.

`TensorWriter` is the other direction: `safetensors.torch.save_file` needs every tensor in memory at once (a
whole quantized variant, a whole compiled shard), so a stage that writes one would grow with the model. The
writer appends each tensor's bytes to a spool file as it comes and, on `close`, writes the header and copies the
spool after it in chunks: resident memory stays one tensor, at the price of writing the data twice.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from mixprec.core.errors import ModelLoadError

__all__ = ["TensorFile", "TensorWriter"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_COPY_CHUNK = 16 * 2**20


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


class TensorWriter:
    """Write a safetensors file one tensor at a time (see the module docstring); `close` finishes the file.

    The result reads back with `safetensors.safe_open` and `TensorFile` like a `save_file` output: tensors in
    the order added, the header padded with spaces to a multiple of 8 bytes as safetensors does. Use as a
    context manager: leaving the block normally finishes the file; an exception leaves neither file behind.
    """

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self._spool.close()
            self._spool_path.unlink(missing_ok=True)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (its bytes are written now; the tensor may be freed right after)."""
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        self._spool.write(memoryview(raw))
        size = data.numel() * data.element_size()
        self._entries[name] = {"dtype": _NAMES[data.dtype], "shape": list(data.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    def close(self) -> None:
        """Write header + data to `path` and remove the spool."""
        self._spool.close()
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        header.update(self._entries)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(spool, out, _COPY_CHUNK)
        self._spool_path.unlink()
