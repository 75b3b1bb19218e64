"""Names and sizes of the compiled mixprec checkpoint format, shared by the writer and the loader.

The layout itself is described in `mixprec.checkpoint.compile`. Keeping the naming rules here (and only here)
means `mixprec.checkpoint.compile` and `mixprec.checkpoint.load` cannot drift apart: a matrix stored in the source under
`<base>.weight` is written as `<base>.qweight` / `<base>.scales` / `<base>.qzeros`, and the loader
finds it again through `original_key(base)`.
"""

from __future__ import annotations

import re
from typing import Any

from mixprec.checkpoint.pack import packed_row_bytes
from mixprec.core.errors import MixprecError, ModelLoadError
from mixprec.model.modelmap import WeightRef

__all__ = [
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "QUANT_METHOD",
    "REPORT_FILE",
    "META_RECIPE",
    "META_RECIPE_SHA",
    "META_TENSOR_BITS",
    "CompileError",
    "quantized_base",
    "original_key",
    "quantized_nbytes",
    "quantization_config_of",
    "group_size_of",
]

#: Version 2 records each matrix's group size (`group_sizes`) and method (`methods`), since a recipe may pick
#: them per group (`--options`); version 1 had one group size for all. Both are read; mixprec releases that read
#: only version 1 refuse version 2 with their "format version ... is not supported" error.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
QUANT_METHOD = "mixprec"
REPORT_FILE = "mixprec_compile.json"
META_RECIPE = "mixprec.recipe"
META_RECIPE_SHA = "mixprec.recipe_sha256"
META_TENSOR_BITS = "mixprec.tensor_bits"
_FUSED_UNIT = re.compile(r"(.+)\.e\d+\.r\d+-\d+")


class CompileError(MixprecError):
    """A recipe cannot be compiled, or a written checkpoint failed verification."""


def quantized_base(ref: WeightRef) -> str:
    """Name prefix of a matrix's `.qweight/.scales/.qzeros` tensors.

    The checkpoint key without `.weight`, or the variant unit name (`<fused key>.e<E>.r<a>-<b>`)
    when the source stores experts fused, so every matrix has its own base.
    """
    if ref.fused_on_disk:
        return ref.unit
    return ref.key.removesuffix(".weight")


def original_key(base: str) -> str:
    """The source checkpoint key a quantized base stands for (inverse of `quantized_base`)."""
    fused = _FUSED_UNIT.fullmatch(base)
    return fused.group(1) if fused else f"{base}.weight"


def quantized_nbytes(shape: tuple[int, int], bits: int, group_size: int, symmetric: bool) -> dict[str, int]:
    """Exact bytes of each stored tensor of one [out, in] matrix: qweight, scales and (asymmetric) qzeros."""
    rows, cols = shape
    groups = -(-cols // group_size)
    sizes = {"qweight": rows * packed_row_bytes(cols, bits), "scales": rows * groups * 2}
    if not symmetric:
        sizes["qzeros"] = rows * packed_row_bytes(groups, bits)
    return sizes


def quantization_config_of(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The validated mixprec `quantization_config` of a config.json dict, or a `ModelLoadError`."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
        raise ModelLoadError(f"{where}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}; "
                             "this is not a `mixprec compile` output (load plain models with load_model)")
    if qconfig.get("version") not in READ_VERSIONS:
        raise ModelLoadError(f"{where}: mixprec format version {qconfig.get('version')!r} is not supported "
                             f"(this mixprec reads versions {READ_VERSIONS}); upgrade mixprec or re-compile the recipe")
    for key, kind in (("bits", dict), ("group_size", int), ("symmetric", bool)):
        if not isinstance(qconfig.get(key), kind):
            raise ModelLoadError(f"{where}: quantization_config.{key} is missing or not a {kind.__name__}")
    sizes = qconfig.get("group_sizes", {})
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v > 0 for v in sizes.values()):
        raise ModelLoadError(f"{where}: quantization_config.group_sizes must map matrices to positive integers")
    return qconfig


def group_size_of(qconfig: dict[str, Any], base: str) -> int:
    """The group size of one stored matrix: its own (format version 2), else the checkpoint's one."""
    return int(qconfig.get("group_sizes", {}).get(base, qconfig["group_size"]))
