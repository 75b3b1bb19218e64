"""A `mixprec compile` output run one layer at a time: each layer's matrices are dequantized only while it runs.

Why: dequantizing the whole model to fp32 (`mixprec.checkpoint.load.load`, 2x a bf16 checkpoint) means evaluating
or running a compiled candidate of a large model needs the memory measuring it was built to avoid. `load` here is
`mixprec.load`: the whole model where it fits, this runner where it does not (or when asked).

This is the streamed runner (`mixprec.model.streaming.StreamedModel`: meta-device skeleton, per-unit residency,
forward hooks) with one change: where a parameter's matrices are stored quantized, reading the parameter unpacks
and dequantizes them (`QuantizedWeight.dequantize`, exactly as the whole load does) into their slice of it; every
other tensor is read as stored. The numbers therefore equal the whole model's bitwise (tests/test_streaming.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mixprec.checkpoint.load import CompiledCheckpoint, dequantize_whole
from mixprec.checkpoint.pack import PackError, unpack_codes
from mixprec.checkpoint.qformat import group_size_of, original_key, quantized_base
from mixprec.core.errors import ModelLoadError
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import WeightRef
from mixprec.model.streaming import StreamedModel, should_stream
from mixprec.quant import QuantizedWeight

__all__ = ["StreamedCompiled", "compiled_as_checkpoint", "load"]


def compiled_as_checkpoint(compiled: CompiledCheckpoint) -> Checkpoint:
    """The compiled folder indexed as a plain checkpoint: every stored tensor, and each quantized matrix also
    under the source key it stands for (so the model map finds every weight, as `mixprec.load` builds it)."""
    key_to_file = dict(compiled.key_to_file)
    for base in compiled.bits:
        key_to_file.setdefault(original_key(base), compiled.key_to_file[f"{base}.qweight"])
    files = sorted({h.path for h in compiled.headers})
    return Checkpoint(compiled.path, compiled.config, files, key_to_file)


class StreamedCompiled(StreamedModel):
    """A compiled checkpoint as a streamed fp32 model (see the module docstring)."""

    def __init__(self, compiled: CompiledCheckpoint, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.compiled = compiled
        self._bits = compiled.bits
        super().__init__(compiled_as_checkpoint(compiled), dtype, device)
        self._refs: dict[str, list[WeightRef]] = defaultdict(list)
        for group in self._family_map.groups:
            for ref in group.weights:
                self._refs[ref.param].append(ref)

    def _read_param(self, name: str, read: Any) -> torch.Tensor:
        refs = self._refs.get(name, [])
        if not any(quantized_base(ref) in self._bits for ref in refs):
            return super()._read_param(name, read)
        tensor = torch.empty(self._params[name].shape, dtype=self.dtype)
        for ref in refs:
            view = ref.slice_memory(tensor)
            base = quantized_base(ref)
            if base in self._bits:
                view.copy_(self._dequantized(base, ref, read))
            else:
                view.copy_(ref.slice_disk(read(ref.key).view(ref.key)))
        self.reads += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _dequantized(self, base: str, ref: WeightRef, read: Any) -> torch.Tensor:
        """One stored matrix unpacked and dequantized, as `mixprec.load` does it."""
        bits, q = self._bits[base], self.compiled.qconfig
        scales = read(f"{base}.scales").get_tensor(f"{base}.scales")
        try:
            codes = unpack_codes(read(f"{base}.qweight").get_tensor(f"{base}.qweight"), bits, ref.shape)
            zeros = (None if q["symmetric"] else
                     unpack_codes(read(f"{base}.qzeros").get_tensor(f"{base}.qzeros"), bits,
                                  (ref.shape[0], scales.shape[1])))
        except PackError as exc:
            raise ModelLoadError(f"{self.compiled.key_to_file[f'{base}.qweight']}: {base}: {exc}") from exc
        return QuantizedWeight(codes, scales, zeros, bits, group_size_of(q, base)).dequantize(self.dtype)


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         verify_hashes: bool = True, streaming: str = "auto") -> torch.nn.Module:
    """`mixprec.load`: a compiled checkpoint as a transformers causal LM in eval mode, weights in `dtype`.

    `streaming` (`mixprec.model.streaming.STREAMING_MODES`): `off` dequantizes the whole model
    (`mixprec.checkpoint.load.load`); `on` returns the same model class whose parameters stay on the meta
    device, each layer read and dequantized only while it runs, so a model larger than memory runs and
    generates (same logits bitwise; it cannot be trained or saved); `auto` (default) streams when the fp32 model
    exceeds half the memory available.

    Example::

        model = mixprec.load("out/stdlib-moe-3bpw")
        logits = model(input_ids).logits
    """
    compiled = CompiledCheckpoint.open(path, verify_hashes)
    if not should_stream(compiled_as_checkpoint(compiled), streaming, torch.device(device)):
        return dequantize_whole(compiled, dtype, device)
    model = StreamedCompiled(compiled, device, dtype).model  # its hooks keep the runner alive
    del model.config.quantization_config  # dequantized on read: a plain float model, as the whole load gives
    return model
