"""Measurement settings: everything that defines a measurement table, plus how one worker runs it.

Kept apart from the worker (`mixprec.measure.run`) so that the table I/O and the input checks can take a
`MeasureConfig` without importing the worker that uses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.storage_url import check_storage
from mixprec.measure.engine.core import EngineConfig
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS, GroupKind
from mixprec.model.data import WindowConfig
from mixprec.model.modelmap import DEFAULT_GRANULARITY, Granularity
from mixprec.model.streaming import STREAMING_MODES
from mixprec.quant import QuantConfig, QuantSettings

__all__ = ["MODES", "MeasureConfig"]

log = logging.getLogger(__name__)

#: drop and raise are measured; split derives per-expert rows from the fine drop table (`mixprec.measure.split`)
MODES = ("drop", "raise", "split")


@dataclass(frozen=True)
class MeasureConfig:
    """Everything that defines a measurement table, plus how this worker runs (device, batching, limits)."""

    work: Path
    model: str | None = None
    mode: str = "drop"
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    base_bits: int = 2
    granularity: str = DEFAULT_GRANULARITY
    kinds: tuple[str, ...] = tuple(k.value for k in DEFAULT_QUANTIZED_KINDS)
    num_windows: int = 32
    seq_len: int = 256
    data_files: tuple[Path, ...] = ()
    split: str = "calibration"
    quant: QuantSettings = field(default_factory=QuantSettings)
    storage: str | None = None
    device: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    batch_jobs: int = 6
    max_jobs: int | None = None
    reset_stale: bool = False
    quantize_missing: bool = True
    streaming: str = "auto"
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MixprecError(f"mode {self.mode!r} is unknown; use one of {MODES}")
        Granularity(self.granularity)
        for kind in self.kinds:
            GroupKind(kind)
        if not self.bits or len(set(self.bits)) != len(self.bits):
            raise MixprecError(f"bits {self.bits} must be a non-empty list without repeats")
        for bits in (*self.bits, self.base_bits):
            self.quant.config(bits)  # validates the width for this quantizer
        if self.mode == "split" and not Granularity(self.granularity).per_expert:
            raise MixprecError(f"split mode divides the fine table's expert losses among the experts; use "
                               f"--granularity expert (or expert-fine) with it, not {self.granularity!r}")
        if self.mode == "raise" and not any(b > self.base_bits for b in self.bits):
            raise MixprecError(f"raise mode from base {self.base_bits} bits needs some --bits above it, "
                               f"got {self.bits}")
        if self.batch_jobs < 1 or (self.max_jobs is not None and self.max_jobs < 0):
            raise MixprecError(f"batch_jobs={self.batch_jobs} must be >= 1 and max_jobs={self.max_jobs} >= 0")
        WindowConfig(self.seq_len, self.num_windows)
        if self.streaming not in STREAMING_MODES:
            raise MixprecError(f"streaming={self.streaming!r} is unknown; use one of {STREAMING_MODES}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise MixprecError(f"max_memory={self.max_memory} bytes must be positive")
        if self.storage is not None:
            check_storage(self.storage)

    @property
    def folder(self) -> Path:
        """`WORK/measure/<mode>-<granularity>[-<quantizer>]`: the quantizer part names only the settings that
        differ from the defaults (e.g. `drop-fine-g128`, `drop-fine-gptq-clip`), so tables of other
        quantizer settings sit beside the default one instead of colliding with it."""
        name = (f"raise-b{self.base_bits}-{self.granularity}" if self.mode == "raise"
                else f"{self.mode}-{self.granularity}")
        quant, default = self.quant, QuantSettings()
        parts = [quant.method if quant.method != default.method else "",
                 f"g{quant.group_size}" if quant.group_size != default.group_size else "",
                 "asym" if quant.symmetric != default.symmetric else "",
                 "clip" if quant.clip_search != default.clip_search else "",
                 f"grid{quant.clip_grid}" if quant.clip_grid != default.clip_grid else ""]
        return Path(self.work) / "measure" / "-".join([name, *(p for p in parts if p)])

    @property
    def measured_bits(self) -> tuple[int, ...]:
        """Bit widths with a row: those above the base in raise mode, all of them otherwise."""
        return tuple(sorted(b for b in self.bits if self.mode != "raise" or b > self.base_bits))

    def quant_config(self, bits: int) -> QuantConfig:
        return self.quant.config(bits)

    @property
    def variant_bits(self) -> tuple[int, ...]:
        """The widths whose variants this measurement reads: every width, and the base in raise mode."""
        return tuple(sorted({*self.bits, *([self.base_bits] if self.mode == "raise" else [])}))

    @property
    def variant_kinds(self) -> tuple[GroupKind, ...]:
        """The group kinds its variants hold: the default ones plus any measured kind beyond them."""
        return tuple(dict.fromkeys([*DEFAULT_QUANTIZED_KINDS, *(GroupKind(k) for k in self.kinds)]))

    def settings(self) -> dict[str, Any]:
        """The part of the config that decides the numbers (recorded and checked by fingerprint).

        `clip_grid` is recorded only when it differs from the default, so tables measured before it was
        a measurement setting keep their fingerprint and summary.
        """
        quant = self.quant
        result: dict[str, Any] = {"mode": self.mode, "granularity": self.granularity, "kinds": list(self.kinds),
                                  "method": quant.method, "group_size": quant.group_size,
                                  "symmetric": quant.symmetric, "clip_search": quant.clip_search}
        if quant.clip_grid != QuantSettings().clip_grid:
            result["clip_grid"] = quant.clip_grid
        result["base_bits"] = self.base_bits if self.mode == "raise" else None
        return result
