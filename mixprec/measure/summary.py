"""summary.json of a measurement, typed: what a finished table was made from and how it was measured.

Kept apart from the table I/O (`mixprec.measure.table`) because the exllamav3 export reads a summary
too, and the table module writes that export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.records import check_schema, record_fields
from mixprec.model.data import DataSpec
from mixprec.model.loading import ModelRecord
from mixprec.quant import QuantSettings

__all__ = ["MEASUREMENT_SCHEMA_VERSION", "REMEASURE", "MeasuredSettings", "VariantUse", "GroupModules",
           "MeasurementSummary"]

MEASUREMENT_SCHEMA_VERSION = 1
#: The fix named by every error about a measurement file.
REMEASURE = "re-run `mixprec measure` with this mixprec version"


@dataclass(frozen=True)
class MeasuredSettings:
    """What a table was measured with (summary.json `settings`); the quantizer keys sit flat in the file.

    `clip_grid` is written only when it differs from the default: tables from before it was recorded
    keep their summary and still compare equal.
    """

    mode: str
    granularity: str
    kinds: tuple[str, ...]
    quant: QuantSettings
    base_bits: int | None
    bits: tuple[int, ...]
    measured_bits: tuple[int, ...]
    num_windows: int
    seq_len: int

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MeasuredSettings:
        quant_keys = [f.name for f in fields(QuantSettings)]
        flat = record_fields(data, _FlatSettings, where, MixprecError, REMEASURE)
        own = {k: v for k, v in flat.items() if k not in quant_keys}
        quant = QuantSettings(**{k: v for k, v in flat.items() if k in quant_keys})
        return cls(**{**own, "kinds": tuple(own["kinds"]), "bits": tuple(own["bits"]),
                      "measured_bits": tuple(own["measured_bits"])}, quant=quant)

    def to_dict(self) -> dict[str, Any]:
        quant = asdict(self.quant)
        if quant["clip_grid"] == QuantSettings().clip_grid:
            del quant["clip_grid"]
        return {"mode": self.mode, "granularity": self.granularity, "kinds": list(self.kinds), **quant,
                "base_bits": self.base_bits, "bits": list(self.bits), "measured_bits": list(self.measured_bits),
                "num_windows": self.num_windows, "seq_len": self.seq_len}


@dataclass(frozen=True)
class _FlatSettings:
    """The keys of `MeasuredSettings` as the file holds them (only for checking them)."""

    mode: str
    granularity: str
    kinds: list[str]
    method: str
    group_size: int
    symmetric: bool
    clip_search: bool
    base_bits: int | None
    bits: list[int]
    measured_bits: list[int]
    num_windows: int
    seq_len: int
    clip_grid: int = 32


@dataclass(frozen=True)
class VariantUse:
    """A variant a table was measured with (summary.json `variants`, keyed by bit width)."""

    variant_id: str
    path: str
    sha256: str
    bpw: float


@dataclass(frozen=True)
class GroupModules:
    """A measured group and the checkpoint modules it covers (exllamav3's `layers` of a group)."""

    kind: str
    layer: int | None
    params: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class MeasurementSummary:
    """summary.json: what a finished table was made from, how it was run, and its noise floors.

    `engine`, `noise_floor`, `base`, `timing` and `counts` are records for people and reports and stay
    JSON objects; `noise_floor_kl` and `base_kl` read the two numbers later stages use.
    """

    mixprec_version: str
    model: ModelRecord
    variants: dict[str, VariantUse]
    data: DataSpec
    settings: MeasuredSettings
    engine: dict[str, Any] | None
    noise_floor: dict[str, Any] | None
    base: dict[str, Any] | None
    timing: dict[str, Any]
    counts: dict[str, Any]
    storage: str
    groups: dict[str, GroupModules]
    schema_version: int = MEASUREMENT_SCHEMA_VERSION

    def noise_floor_kl(self, name: str) -> float | None:
        """Mean KL of a noise floor (`repeat_fp32` or `bf16_compute`), None when not recorded."""
        return ((self.noise_floor or {}).get(name) or {}).get("kl_mean")

    @property
    def base_kl(self) -> float | None:
        """Mean KL of the raise-mode base (every group at the base width), None in drop mode."""
        return ((self.base or {}).get("summary") or {}).get("kl_mean")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MeasurementSummary:
        check_schema(data, MEASUREMENT_SCHEMA_VERSION, where, MixprecError, REMEASURE)
        record_fields(data, cls, where, MixprecError, REMEASURE)
        try:
            return cls(**{**data, "model": ModelRecord(**data["model"]), "data": DataSpec(**data["data"]),
                          "variants": {str(b): VariantUse(**v) for b, v in data["variants"].items()},
                          "settings": MeasuredSettings.from_dict(data["settings"], f"{where}: settings"),
                          "groups": {str(k): GroupModules(**{**g, "modules": tuple(g["modules"])})
                                     for k, g in data["groups"].items()}})
        except (TypeError, KeyError, AttributeError) as exc:
            raise MixprecError(f"{where}: malformed summary ({exc}); {REMEASURE}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "mixprec_version": self.mixprec_version,
            "model": self.model.to_dict(), "variants": {b: asdict(v) for b, v in self.variants.items()},
            "data": self.data.to_dict(), "settings": self.settings.to_dict(), "engine": self.engine,
            "noise_floor": self.noise_floor, "base": self.base, "timing": self.timing, "counts": self.counts,
            "storage": self.storage,
            "groups": {k: {**asdict(g), "modules": list(g.modules)} for k, g in self.groups.items()},
        }
