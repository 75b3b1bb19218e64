"""The quantizer contract: settings, integer codes + scales, exact bit accounting, and a registry.

A quantizer maps a float matrix [out, in] to `QuantizedWeight`: real integer codes, fp16 scales
(and integer zero points when asymmetric), grouped along the input (last) dimension. Every later
stage (variants, measurement, compile) only sees this type, so GPTQ or any other method plugs in by
subclassing `Quantizer` and registering itself; nothing else changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

import torch

from mixprec.core.errors import QuantConfigError

__all__ = [
    "SUPPORTED_BITS",
    "INTEGER_CODE_BITS",
    "SUPPORTED_GROUP_SIZES",
    "SCALE_BITS",
    "QuantSettings",
    "QuantConfig",
    "QuantizedWeight",
    "Quantizer",
    "register_quantizer",
    "get_quantizer",
    "quantizer_class",
    "quantizer_names",
    "storage_bits",
    "integer_code_bits",
]

#: Widths the stored format can hold (the bit packer packs 1..8); each method declares its own subset.
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: Widths of the integer-code methods (RTN, GPTQ): a symmetric 1-bit grid is {-s, 0}, which is no quantizer.
INTEGER_CODE_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
#: Scales are stored as fp16: 16 bits per group, counted in every bpw figure.
SCALE_BITS = 16


@dataclass(frozen=True, kw_only=True)
class QuantSettings:
    """How one quantizer runs, apart from the width: the one settings type of every stage.

    A recipe stores these once for all its groups (its `quantizer:` section), a measurement records them
    for all its widths, and `config(bits)` gives the `QuantConfig` of one width. Validated on construction
    against the method's declared traits.
    """

    method: str = "rtn"
    group_size: int = 64
    symmetric: bool = True
    clip_search: bool = False
    clip_grid: int = 32

    def __post_init__(self) -> None:
        for key, kind in (("method", str), ("group_size", int), ("symmetric", bool), ("clip_search", bool),
                          ("clip_grid", int)):
            value = getattr(self, key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise QuantConfigError(f"{key} must be {'an integer' if kind is int else kind.__name__}, "
                                       f"got {value!r}")
        method = quantizer_class(self.method)  # the method's own traits decide which values it accepts
        if self.group_size not in method.supported_group_sizes:
            raise QuantConfigError(
                f"group_size={self.group_size} is not supported; choose one of {method.supported_group_sizes}"
            )
        if self.clip_grid < 2:
            raise QuantConfigError(f"clip_grid={self.clip_grid} must be at least 2")
        if type(self) is QuantSettings:
            self.config(method.supported_bits[0])  # the method's own checks (`check_config`) need a width

    @property
    def settings(self) -> QuantSettings:
        """Just the settings, without a width (what a `QuantConfig` shares with the other widths)."""
        return QuantSettings(**{f.name: getattr(self, f.name) for f in fields(QuantSettings)})

    def config(self, bits: int) -> QuantConfig:
        """The config of one width under these settings."""
        return QuantConfig(**{f.name: getattr(self, f.name) for f in fields(QuantSettings)}, bits=bits)


@dataclass(frozen=True, kw_only=True)
class QuantConfig(QuantSettings):
    """The settings of one uniform quantization at one width; stored in every variant's manifest."""

    bits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        method = quantizer_class(self.method)
        if self.bits not in method.supported_bits:
            raise QuantConfigError(_width_refusal(self.method, self.bits))
        method.check_config(self)

    @property
    def variant_id(self) -> str:
        """Folder name of the variant, e.g. `rtn-b4-g64-sym` (a method may name it otherwise: `gguf-q4_k`)."""
        return quantizer_class(self.method).variant_name(self)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Exact bits per weight of a matrix of `shape`, codes + scales (+ zero points)."""
        return storage_bits(self, shape) / (shape[0] * shape[1])


def _width_refusal(method: str, bits: int) -> str:
    """Why `method` refuses a width, naming the methods that do have it (1 bit: only the i-quant ladder)."""
    others = [name for name in quantizer_names() if bits in quantizer_class(name).supported_bits]
    where = f"; --method {' / '.join(others)} has a {bits}-bit width" if others else ""
    return (f"bits={bits} is out of range for --method {method}; choose one of "
            f"{quantizer_class(method).supported_bits}{where}")


def storage_bits(config: QuantConfig, shape: tuple[int, int]) -> int:
    """Exact storage of one matrix of `shape` quantized at `config`, before quantizing it: what the method
    itself says it will store (`Quantizer.planned_storage_bits`), so planned costs (the search's budget check,
    the nearest-uniform baseline) equal the bits a variant really holds for every method."""
    return quantizer_class(config.method).planned_storage_bits(config, shape)


def integer_code_bits(config: QuantConfig, shape: tuple[int, int]) -> int:
    """The plain payload's storage: b bits per code, 16 per scale, b per zero point (asymmetric).

    A partial last group (input dimension not a multiple of the group size) still pays a full scale.
    """
    rows, cols = shape
    groups = rows * math.ceil(cols / config.group_size)
    per_group = SCALE_BITS + (0 if config.symmetric else config.bits)
    return rows * cols * config.bits + groups * per_group


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes [out, in] (uint8, 0..2^b-1), scales [out, groups] fp16, zeros [out, groups] or None.

    Dequantization is `scale * (code - zero)`, with `zero = 2^(b-1)` for symmetric quantization.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix these codes stand for."""
        rows, cols = self.codes.shape
        zero = (self.zeros.to(torch.float32) if self.zeros is not None
                else torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.float32))
        scale = self.scales.to(torch.float32)
        groups = scale.shape[1]
        padded = groups * self.group_size
        codes = self.codes.to(torch.float32)
        if padded != cols:
            codes = torch.nn.functional.pad(codes, (0, padded - cols))
        codes = codes.view(rows, groups, self.group_size)
        values = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        return values.view(rows, padded)[:, :cols].to(dtype)

    def storage_bits(self) -> int:
        """Exact bits this weight occupies when packed (codes + scales + zero points)."""
        zero_bits = 0 if self.zeros is None else self.zeros.numel() * self.bits
        return self.codes.numel() * self.bits + self.scales.numel() * SCALE_BITS + zero_bits


class Quantizer(ABC):
    """A quantization method. Subclasses implement `quantize` for one 2-D matrix.

    `hessian` is the input second-moment matrix [in, in] (X^T X over calibration tokens) that
    error-compensating methods such as GPTQ need; methods that do not use it ignore it.

    Each registered subclass declares its traits itself, so callers ask the registry
    (`quantizer_class(method).needs_hessian`) instead of naming methods:

    * `needs_hessian`: `quantize` refuses to run without a Hessian, so variants of this method are
      built with a calibration (`mixprec.quant.calibration`), whose solver settings the quantizer
      then takes as its second constructor argument;
    * `supported_bits`, `supported_group_sizes`: the widths and group sizes it accepts
      (`QuantConfig` refuses the others).
    """

    name: ClassVar[str]
    needs_hessian: ClassVar[bool]
    supported_bits: ClassVar[tuple[int, ...]]
    supported_group_sizes: ClassVar[tuple[int, ...]]

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @classmethod
    def check_config(cls, config: QuantConfig) -> None:
        """Refuse settings beyond bits and group size that this method cannot honour (QuantConfigError)."""
        return None

    @classmethod
    def planned_storage_bits(cls, config: QuantConfig, shape: tuple[int, int]) -> int:
        """Bits a matrix of `shape` will occupy at `config` (the plain payload's codes, scales, zero points);
        a method with its own payload overrides it, and the contract test holds every method to it."""
        return integer_code_bits(config, shape)

    @classmethod
    def variant_name(cls, config: QuantConfig) -> str:
        """Folder name of a variant at `config`."""
        return f"{config.method}-b{config.bits}-g{config.group_size}-{'sym' if config.symmetric else 'asym'}"

    def restore(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                shape: tuple[int, int]) -> QuantizedWeight:
        """Rebuild one stored matrix [out, in] = `shape` from the tensors a variant file holds."""
        return QuantizedWeight(codes, scales, zeros, self.config.bits, self.config.group_size)

    @abstractmethod
    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        """Quantize one matrix [out, in]."""

    def quantize_experts(self, weight: torch.Tensor,
                         hessians: list[torch.Tensor | None] | None = None) -> list[QuantizedWeight]:
        """Quantize a fused expert tensor [E, out, in] expert by expert (each with its own Hessian)."""
        if weight.dim() != 3:
            raise ValueError(f"expected a 3-D expert tensor [E, out, in], got shape {tuple(weight.shape)}")
        hessians = hessians or [None] * weight.shape[0]
        return [self.quantize(weight[e], hessians[e]) for e in range(weight.shape[0])]


_REGISTRY: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound=type[Quantizer])


_TRAITS = ("needs_hessian", "supported_bits", "supported_group_sizes")


def register_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator that makes a quantizer available as `QuantConfig(method=name)`.

    Refuses a class that does not declare every trait itself: an inherited trait would silently
    claim what the base class (or another method) supports.
    """

    def decorate(cls: Q) -> Q:
        missing = [trait for trait in _TRAITS if trait not in vars(cls)]
        if missing:
            raise TypeError(f"quantizer {cls.__name__} must declare the traits {missing} on its class")
        unsupported = ((set(cls.supported_bits) - set(SUPPORTED_BITS))
                       | (set(cls.supported_group_sizes) - set(SUPPORTED_GROUP_SIZES)))
        if unsupported:
            raise TypeError(f"quantizer {cls.__name__} declares {sorted(unsupported)}, which the stored format "
                            f"cannot hold (bits {SUPPORTED_BITS}, group sizes {SUPPORTED_GROUP_SIZES})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def quantizer_names() -> list[str]:
    return sorted(_REGISTRY)


def quantizer_class(method: str) -> type[Quantizer]:
    """The registered class of `method`, whose traits say what it needs and accepts."""
    if method not in _REGISTRY:
        raise QuantConfigError(f"unknown quantization method {method!r}; known: {quantizer_names()}")
    return _REGISTRY[method]


def get_quantizer(config: QuantConfig, solver: object | None = None) -> Quantizer:
    """Instantiate the registered quantizer for `config.method`.

    `solver` (e.g. a calibration's `GPTQSettings`) goes only to methods that need the Hessian; the
    others have no solver settings and ignore it.
    """
    method = quantizer_class(config.method)
    if method.needs_hessian and solver is not None:
        return method(config, solver)  # type: ignore[call-arg]
    return method(config)
