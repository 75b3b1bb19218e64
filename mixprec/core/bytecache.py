"""A least-recently-used cache bounded by the bytes of the tensors it holds.

The KL engine keeps two such caches: dequantized weights (so composing recipes does not re-read
and re-dequantize the same matrices from disk) and hidden states after a layer under a given
prefix assignment (so a recipe that shares its first layers with an earlier one starts late).
Both grow with the model, so both are bounded by bytes rather than by entry count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

__all__ = ["ByteLRU", "tensor_bytes"]


def tensor_bytes(value: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Bytes held by one tensor or a sequence of tensors."""
    tensors = [value] if isinstance(value, torch.Tensor) else list(value)
    return sum(t.numel() * t.element_size() for t in tensors)


class ByteLRU:
    """Maps hashable keys to tensors (or lists of tensors); evicts the least recently used beyond `max_bytes`.

    A value larger than the whole budget is not stored at all, so a cache of 0 bytes is a valid
    way to switch caching off.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> object | None:
        """The value for `key` (marking it recently used), or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: torch.Tensor | Sequence[torch.Tensor]) -> bool:
        """Store `value`; returns False when it alone exceeds the budget (nothing is stored then)."""
        size = tensor_bytes(value)
        if size > self.max_bytes:
            return False
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        while self._items and self.bytes + size > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1][1]
        self._items[key] = (value, size)
        self.bytes += size
        return True

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
