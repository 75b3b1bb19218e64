"""Quantizers: the contract (`base`) and its implementations, registered by method name."""

from __future__ import annotations

from mixprec.quant import ggml as _ggml  # noqa: F401  (registers "gguf", "gguf-imatrix", "gguf-iq")
from mixprec.quant import gptq as _gptq  # noqa: F401  (registers "gptq")
from mixprec.quant import rtn as _rtn  # noqa: F401  (registers "rtn")
from mixprec.quant.base import (
    INTEGER_CODE_BITS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantConfig,
    QuantizedWeight,
    Quantizer,
    QuantSettings,
    get_quantizer,
    quantizer_class,
    quantizer_names,
    register_quantizer,
    storage_bits,
)

__all__ = [
    "INTEGER_CODE_BITS",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantConfig",
    "QuantizedWeight",
    "Quantizer",
    "QuantSettings",
    "get_quantizer",
    "quantizer_class",
    "quantizer_names",
    "register_quantizer",
    "storage_bits",
]
