"""llama.cpp's own quant types (Q2_K … Q8_0, IQ4_XS, …) as mixprec quantizers, quantized by ggml itself.

A GGUF recipe is only as good as its measurements, and a measurement is only honest if it sees the
weights llama.cpp will really run. So nothing here re-implements a ggml type: every matrix is quantized
by libggml's `ggml_quantize_chunk` (reached through ctypes in the llama-cpp-python install, the same
code `llama-quantize` runs), and dequantized by the `gguf` package, which reads every K and IQ type.
The stored payload is the raw ggml blocks, so its bits are exactly what the GGUF file will hold.

The rest of mixprec keys options by an integer width (variants, measurement rows, the DP, recipes), so
each method is a *ladder*: a width -> ggml type table (`gguf`: 2 -> Q2_K, 3 -> Q3_K, …, 8 -> Q8_0).
Bits are never the ladder's nominal width: they come from `GGML_QUANT_SIZES` (Q2_K is 2.625 bpw) and
follow llama.cpp's shape fallback (a row length not divisible by 256 turns Q4_K into Q5_0, …), so the
bit accounting of a recipe is that of the file llama.cpp writes. `gguf-imatrix` uses the same ladder
with an importance matrix (the diagonal of mixprec's calibration Hessians, Σx² per input column, which
is what `llama-imatrix` collects), and `gguf-iq` is the i-quant ladder, which needs one for 1 and 2 bits.
Its width 1 is IQ1_M (1.75 bpw), the rung quant publishers give cold experts of huge MoEs; IQ1_S (1.5625 bpw,
coarser block scales) is left out because a ladder holds one type per integer width.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixprec.core.errors import MixprecError, QuantConfigError
from mixprec.quant.base import QuantConfig, QuantizedWeight, Quantizer, register_quantizer

__all__ = [
    "LADDERS",
    "FALLBACKS",
    "GGMLQuantizedWeight",
    "GGMLQuantizer",
    "GGMLQuantizerIMatrix",
    "GGMLQuantizerIQ",
    "ggml_type_for",
    "effective_type",
    "type_bits",
    "row_nbytes",
    "quantize_ggml",
    "dequantize_ggml",
    "llama_cpp_library",
]

#: method -> {width: ggml type}. Widths are the integer keys the rest of mixprec speaks in.
LADDERS: dict[str, dict[int, str]] = {
    "gguf": {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"},
    "gguf-imatrix": {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"},
    "gguf-iq": {1: "IQ1_M", 2: "IQ2_XXS", 3: "IQ3_S", 4: "IQ4_XS", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"},
}

#: llama.cpp's substitutes when a row length is not divisible by the type's block size
#: (`tensor_type_fallback` in src/llama-quant.cpp); F16 when the substitute does not fit either.
FALLBACKS: dict[str, str] = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    **{t: "Q4_0" for t in ("Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

#: Types llama-quantize refuses to write without an importance matrix: `ggml_quantize_requires_imatrix`
#: (IQ2_XXS, IQ2_XS, IQ1_S), and IQ1_M, which libggml quantizes without one but llama-quant.cpp refuses for
#: every tensor but the embeddings and the output (its error without one is 1.5x that with one).
_NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")


def _gguf() -> Any:
    """The `gguf` package, or a one-line error saying how to install it (optional dependency)."""
    try:
        import gguf
    except ImportError as exc:
        raise MixprecError("ggml quant types need the `gguf` package: pip install 'mixprec[gguf]'") from exc
    return gguf


def _qtype(name: str) -> Any:
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise QuantConfigError(f"unknown ggml type {name!r}; known: "
                               f"{', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None


def effective_type(name: str, cols: int) -> str:
    """The type llama.cpp really writes for a row length of `cols` when asked for `name`."""
    block, _ = _gguf().GGML_QUANT_SIZES[_qtype(name)]
    if cols % block == 0:
        return name
    fallback = FALLBACKS.get(name, name if block <= 32 else "F16")
    return fallback if cols % _gguf().GGML_QUANT_SIZES[_qtype(fallback)][0] == 0 else "F16"


def row_nbytes(name: str, cols: int) -> int:
    """Bytes of one row of `cols` weights in type `name` (which must fit the row length)."""
    block, size = _gguf().GGML_QUANT_SIZES[_qtype(name)]
    if cols % block:
        raise QuantConfigError(f"a row of {cols} weights does not fit ggml type {name} (block {block}); "
                               "use effective_type() first")
    return cols // block * size


def type_bits(name: str) -> float:
    """Exact bits per weight of a ggml type (block bytes x 8 / block size), e.g. Q2_K -> 2.625."""
    block, size = _gguf().GGML_QUANT_SIZES[_qtype(name)]
    return size * 8 / block


def ggml_type_for(method: str, bits: int, cols: int | None = None) -> str:
    """The ggml type a ladder method writes at width `bits` (after the shape fallback when `cols` is given)."""
    try:
        name = LADDERS[method][bits]
    except KeyError:
        raise QuantConfigError(f"{method} has no {bits}-bit type; widths: {sorted(LADDERS.get(method, {}))} "
                               f"({LADDERS.get(method)})") from None
    return name if cols is None else effective_type(name, cols)


def llama_cpp_library(name: str = "ggml-base") -> Path:
    """Path of a shared library in the llama-cpp-python install (`libggml-base.so` holds the quantizers)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise MixprecError("quantizing to ggml types needs llama-cpp-python (it ships libggml): "
                           "bash runs/setup.sh installs it, or pip install 'mixprec[gguf]'")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for candidate in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (lib_dir / candidate).exists():
            return lib_dir / candidate
    raise MixprecError(f"{lib_dir} has no lib{name} library; reinstall llama-cpp-python (bash runs/setup.sh)")


@cache
def _libggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(llama_cpp_library()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def quantize_ggml(weight: torch.Tensor, name: str, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """Raw ggml blocks [rows, row bytes] (uint8) of a float matrix, exactly as llama-quantize writes them.

    `imatrix` is one importance weight per input column (llama.cpp's imatrix for this matrix).
    """
    rows, cols = weight.shape
    if name in _NEEDS_IMATRIX and imatrix is None:
        raise QuantConfigError(f"ggml type {name} needs an importance matrix; quantize with calibration "
                               "(--method gguf-iq uses the calibration Hessians' diagonals)")
    src = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy())
    dst = np.empty((rows, row_nbytes(name, cols)), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix.detach().to(torch.float32).cpu().numpy())
    if imat is not None and imat.shape != (cols,):
        raise QuantConfigError(f"importance matrix has shape {imat.shape}, expected ({cols},)")
    lib = _libggml()
    qtype = int(_qtype(name))
    if lib.ggml_row_size(qtype, cols) != dst.shape[1]:
        raise MixprecError(f"libggml and the gguf package disagree on the row size of {name}; "
                           "install matching versions (bash runs/setup.sh)")
    written = lib.ggml_quantize_chunk(qtype, src.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                      None if imat is None else imat.ctypes.data)
    if written != dst.nbytes:
        raise MixprecError(f"ggml_quantize_chunk wrote {written} bytes for {name}, expected {dst.nbytes}")
    return dst


def dequantize_ggml(data: np.ndarray, name: str, cols: int) -> torch.Tensor:
    """The float32 matrix [rows, cols] that llama.cpp computes with, from raw ggml blocks."""
    values = _gguf().quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8), _qtype(name))
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(data.shape[0], cols).copy())


@dataclass(frozen=True)
class GGMLQuantizedWeight(QuantizedWeight):
    """Raw ggml blocks of one matrix: `codes` is uint8 [rows, row bytes], `scales` is empty [rows, 0]
    (scales live inside the blocks), `ggml_type` is the type really written (after the shape fallback)."""

    ggml_type: str = "Q8_0"
    cols: int = 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ggml(self.codes.numpy(), self.ggml_type, self.cols).to(dtype)

    def storage_bits(self) -> int:
        """Exact bits in the GGUF file: the blocks, nothing else."""
        return self.codes.numel() * 8


_LADDER_BITS = (2, 3, 4, 5, 6, 8)
#: The i-quant ladder also has a sub-2-bit rung (IQ1_M); the K-quant ladders have no 1-bit type.
_IQ_LADDER_BITS = (1, *_LADDER_BITS)


class GGMLQuantizer(Quantizer):
    """A ladder of ggml types quantized by libggml (`gguf`: K-quants, no importance matrix).

    Subclasses with `needs_hessian` weight the rounding error by the Hessian diagonal (llama.cpp's imatrix);
    they take (and ignore) the calibration's solver settings, which only GPTQ uses.
    """

    needs_hessian = False
    supported_bits = _LADDER_BITS
    #: ggml types have their own block layout; 64 is only the value every QuantConfig carries by default.
    supported_group_sizes = (64,)

    def __init__(self, config: QuantConfig, solver: object | None = None) -> None:
        super().__init__(config)

    @classmethod
    def check_config(cls, config: QuantConfig) -> None:
        ggml_type_for(cls.name, config.bits)
        if not config.symmetric or config.clip_search:
            raise QuantConfigError(f"--method {cls.name} uses ggml's own block layout: drop --asym and "
                                   "--clip-search")

    @classmethod
    def variant_name(cls, config: QuantConfig) -> str:
        return f"{cls.name}-{ggml_type_for(cls.name, config.bits).lower()}"

    @classmethod
    def planned_storage_bits(cls, config: QuantConfig, shape: tuple[int, int]) -> int:
        """The blocks llama.cpp writes: the ladder's type after the row-length fallback (Q2_K is 2.625 bpw)."""
        rows, cols = shape
        return rows * row_nbytes(ggml_type_for(cls.name, config.bits, cols), cols) * 8

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        rows, cols = weight.shape
        name = ggml_type_for(self.name, self.config.bits, cols)
        if self.needs_hessian and hessian is None:
            raise QuantConfigError(f"--method {self.name} weights errors by an importance matrix: quantize with "
                                   "calibration (mixprec quantize collects the Hessians)")
        imatrix = torch.diagonal(hessian).clamp_min(0) if (hessian is not None and self.needs_hessian) else None
        data = torch.from_numpy(quantize_ggml(weight, name, imatrix))
        block = _gguf().GGML_QUANT_SIZES[_qtype(name)][0]
        return GGMLQuantizedWeight(data, torch.empty(rows, 0, dtype=torch.float16), None, self.config.bits,
                                   block, ggml_type=name, cols=cols)

    def restore(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                shape: tuple[int, int]) -> QuantizedWeight:
        name = ggml_type_for(self.name, self.config.bits, shape[1])
        block = _gguf().GGML_QUANT_SIZES[_qtype(name)][0]
        return GGMLQuantizedWeight(codes, scales, None, self.config.bits, block, ggml_type=name, cols=shape[1])


register_quantizer("gguf")(GGMLQuantizer)


@register_quantizer("gguf-imatrix")
class GGMLQuantizerIMatrix(GGMLQuantizer):
    """The K-quant ladder weighted by an importance matrix from the calibration Hessians."""

    needs_hessian = True
    supported_bits = _LADDER_BITS
    supported_group_sizes = (64,)


@register_quantizer("gguf-iq")
class GGMLQuantizerIQ(GGMLQuantizer):
    """The i-quant ladder (IQ1_M, IQ2_XXS, IQ3_S, IQ4_XS, then K-quants), with the calibration importance matrix."""

    needs_hessian = True
    supported_bits = _IQ_LADDER_BITS
    supported_group_sizes = (64,)
