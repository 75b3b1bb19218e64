"""Swapping quantized matrices into a live model and back, for the KL engine.

A group's matrices are views into the model's parameters (`WeightRef.slice_memory`: a row range of
one expert of a fused 3-D tensor, or a whole `nn.Linear` weight), so a swap is an in-place copy and
the restore copies the saved originals back, bit for bit (on a streamed model it reads them from the
checkpoint again instead of keeping a copy: same values, half the memory). Dequantized matrices are kept in a
byte-bounded LRU: a search composes the same (matrix, width) pairs over and over, and reading and
dequantizing them from the variant file each time would dominate a short evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from mixprec.core.bytecache import ByteLRU
from mixprec.model.modelmap import ModelMap, WeightRef
from mixprec.quant.variants import Variant

__all__ = ["Setting", "WeightSwapper"]

#: The groups set at one layer position, as sorted (group name, bits) pairs.
Setting = tuple[tuple[str, int], ...]


class WeightSwapper:
    """Puts variants' matrices into a model's parameters for the duration of a `with` block."""

    def __init__(self, model: torch.nn.Module, model_map: ModelMap, variants: Mapping[int, Variant],
                 cache_bytes: int, restore: Callable[[WeightRef, torch.Tensor], None] | None = None) -> None:
        self.model_map = model_map
        self.variants = variants
        self._restore = restore
        self._params = dict(model.named_parameters())
        self._cache = ByteLRU(cache_bytes)

    @property
    def cache(self) -> ByteLRU:
        return self._cache

    def dequantized(self, ref: WeightRef, bits: int, like: torch.Tensor) -> torch.Tensor:
        """The matrix `ref` of the `bits` variant in the dtype and on the device of `like`."""
        key = (ref.unit, bits)
        weight = self._cache.get(key)
        if weight is None:
            weight = self.variants[bits].dequantized(ref, like.dtype).to(like.device)
            self._cache.put(key, weight)
        return weight  # type: ignore[return-value]

    @contextmanager
    def swapped(self, setting: Setting) -> Iterator[None]:
        """Copy the variants' matrices into the model for the block, then copy the originals back."""
        saved: list[tuple[WeightRef, torch.Tensor, torch.Tensor | None]] = []
        try:
            with torch.no_grad():
                for name, bits in setting:
                    for ref in self.model_map.group(name).weights:
                        view = ref.slice_memory(self._params[ref.param])
                        saved.append((ref, view, view.clone() if self._restore is None else None))
                        view.copy_(self.dequantized(ref, bits, view))
            yield
        finally:
            with torch.no_grad():
                for ref, view, original in reversed(saved):
                    if original is None:
                        self._restore(ref, view)  # type: ignore[misc]
                    else:
                        view.copy_(original)
