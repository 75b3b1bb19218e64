"""The recipe: a versioned, ordered map from weight group to bit width (or option), written as YAML.

A recipe is what the search writes and what `mixprec compile` reads. It names groups exactly as
the model map does (`layers.3.attn`, `layers.3.experts.down`, ...) at one granularity; `null` keeps a
group at its original precision. Every recipe carries the model fingerprint (so it is never applied
to another model), the quantizer settings shared by all groups, the budget and achieved bpw, its
provenance (measurement, data splits, solver) and its predicted and measured KL.

Example::

    schema_version: 1
    kind: mixprec.recipe
    model: {name: stdlib-moe, model_type: qwen2_moe, fingerprint: 3f2a...}
    granularity: layer
    quantizer: {method: rtn, group_size: 64, symmetric: true, clip_search: false, clip_grid: 32}
    budget: {bpw: 3.0}
    achieved: {bpw: 2.996}
    groups:
      layers.0.attn: 6
      layers.0.mlp: 4
      layers.1.experts: 2
    provenance: {solver: dp}
    kl: {predicted: 0.0123, evaluation: 0.0119}

A group may also name an option label instead of a width (`layers.0.attn: gptq-b4-g32`,
`mixprec.quant.options`): that width at its own method and group size, with the `quantizer:` section's
symmetry and clip settings. A recipe that uses a label is written as schema version 2 (older mixprec
versions refuse it with their schema-version error); one with widths only stays version 1, so both
load here.

Only `yaml.safe_load` is used; unknown keys and group names get errors naming the nearest valid ones.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mixprec.core.errors import FingerprintMismatchError, MixprecError, QuantConfigError
from mixprec.core.fileio import atomic_write_text, dump_yaml, parse_yaml, read_yaml
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS
from mixprec.model.modelmap import Granularity, ModelMap
from mixprec.quant import QuantConfig, QuantSettings, quantizer_class
from mixprec.quant.options import OptionKey, is_option_label, option_config, option_width

__all__ = ["RECIPE_SCHEMA_VERSION", "RECIPE_SCHEMA_VERSIONS", "RecipeError", "ModelRef", "Budget", "Recipe"]

#: The version written when a recipe names option labels; widths-only recipes are written as version 1.
RECIPE_SCHEMA_VERSION = 2
RECIPE_SCHEMA_VERSIONS = (1, 2)
_KIND = "mixprec.recipe"


class RecipeError(MixprecError):
    """A recipe file is malformed or does not fit the model it is applied to."""


def _nearest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.3)
    return ", ".join(close or valid[:3])


def _check_keys(where: str, data: dict[str, Any], allowed: list[str], required: list[str]) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r}; nearest valid: {_nearest(str(key), allowed)}")
    for key in required:
        if key not in data:
            raise RecipeError(f"{where}: required key {key!r} is missing")


@dataclass(frozen=True)
class ModelRef:
    """Which model a recipe belongs to; the fingerprint is `Checkpoint.fingerprint`."""

    name: str
    model_type: str
    fingerprint: str

    def __post_init__(self) -> None:
        for key in ("name", "model_type", "fingerprint"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise RecipeError(f"model.{key} must be a non-empty string (quote it in YAML), got {value!r}")


@dataclass(frozen=True)
class Budget:
    """The size target: average bits per quantized weight, or total quantized size in GiB (exactly one)."""

    bpw: float | None = None
    gib: float | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.gib is None):
            raise RecipeError(f"a budget needs exactly one of bpw or gib, got bpw={self.bpw} gib={self.gib}")
        value = self.bpw if self.bpw is not None else self.gib
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise RecipeError(f"budget must be a positive finite number (e.g. bpw: 3.0), got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """Group -> bits or option label (None keeps the original precision), plus what the recipe is for and
    where it came from."""

    model: ModelRef
    granularity: Granularity
    quantizer: QuantSettings
    groups: dict[str, OptionKey]
    budget: Budget | None = None
    achieved: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantizer", self.quantizer.settings)  # a QuantConfig's width is no recipe's
        supported = quantizer_class(self.quantizer.method).supported_bits
        for name, bits in self.groups.items():
            if is_option_label(bits):
                self._check_label(name, str(bits))
            elif bits is not None and (type(bits) is not int or bits not in supported):
                raise RecipeError(f"group {name!r}: bits {bits!r} is not one of {supported} (an integer), an "
                                  "option label such as gptq-b4-g32, or null")

    def _check_label(self, name: str, label: str) -> None:
        try:
            option_config(label, self.quantizer)
        except QuantConfigError as exc:
            raise RecipeError(f"group {name!r}: option {label!r}: {exc}") from exc

    @property
    def uses_options(self) -> bool:
        """Whether some group names an option label (a width at its own method or group size)."""
        return any(isinstance(o, str) for o in self.groups.values())

    def widths(self) -> dict[str, int | None]:
        """Group -> bit width, with each option label reduced to its width (for bits-only formats)."""
        return {name: None if o is None else option_width(o) for name, o in self.groups.items()}

    def require_widths(self, target: str) -> None:
        """Refuse a recipe with option labels for a format that holds one group size and method for all."""
        if self.uses_options:
            used = sorted({str(o) for o in self.groups.values() if isinstance(o, str)})
            raise RecipeError(f"{target} holds one group size and method per checkpoint, but the recipe picks "
                              f"them per group ({', '.join(used[:3])}); compile it in the mixprec format, or search "
                              "without --options")

    # -- YAML -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": RECIPE_SCHEMA_VERSION if self.uses_options else 1,
            "kind": _KIND,
            "model": asdict(self.model),
            "granularity": self.granularity.value,
            "quantizer": asdict(self.quantizer),
            "budget": None if self.budget is None else {k: v for k, v in asdict(self.budget).items() if v is not None},
            "achieved": dict(self.achieved),
            "groups": dict(self.groups),
            "provenance": dict(self.provenance),
            "kl": dict(self.kl),
        }

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write the recipe atomically."""
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
        top = [f.name for f in fields(cls)] + ["schema_version", "kind"]
        _check_keys(where, data, top, ["schema_version", "model", "granularity", "quantizer", "groups"])
        if data["schema_version"] not in RECIPE_SCHEMA_VERSIONS:
            raise RecipeError(f"{where}: schema_version {data['schema_version']!r} is not supported "
                              f"(this mixprec reads versions {RECIPE_SCHEMA_VERSIONS})")
        if data.get("kind", _KIND) != _KIND:
            raise RecipeError(f"{where}: kind {data['kind']!r} is not {_KIND!r}; is this an exllamav3 override "
                              "YAML? Convert it with the exllamav3 importer")
        try:
            return cls(
                model=ModelRef(**_section(where, data, "model", ModelRef)),
                granularity=Granularity(data["granularity"]),
                quantizer=_quantizer(where, _section(where, data, "quantizer", QuantSettings)),
                groups=_groups(where, data["groups"]),
                budget=None if data.get("budget") is None else Budget(**_section(where, data, "budget", Budget)),
                achieved=_numbers(where, data, "achieved"),
                provenance=_mapping(where, data, "provenance"),
                kl=_numbers(where, data, "kl"),
            )
        except ValueError as exc:  # Granularity() and dataclass validation
            raise RecipeError(f"{where}: {exc}") from exc

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        return cls.from_dict(parse_yaml(text, where, RecipeError), where)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.from_dict(*read_yaml(path, "recipe", RecipeError))

    # -- checks against a model ------------------------------------------------------------------
    def quant_config(self, option: int | str) -> QuantConfig:
        """The settings of one width or option label under the recipe's shared settings."""
        return option_config(option, self.quantizer)

    def check_model(self, model_map: ModelMap, fingerprint: str | None = None) -> None:
        """Refuse a recipe for another model, of another granularity, or with unknown or missing groups."""
        if fingerprint is not None and fingerprint != self.model.fingerprint:
            raise FingerprintMismatchError(
                f"recipe is for model {self.model.name} (fingerprint {self.model.fingerprint[:12]}…) but the "
                f"given model has fingerprint {fingerprint[:12]}…; search a recipe for this model instead")
        if model_map.granularity is not self.granularity:
            raise RecipeError(f"recipe granularity {self.granularity.value!r} differs from the model map's "
                              f"{model_map.granularity.value!r}")
        valid = model_map.names()
        for name in self.groups:
            if name not in valid:
                raise RecipeError(f"recipe names unknown group {name!r}; nearest valid: {_nearest(name, valid)}")
        missing = [g.name for g in model_map.select(DEFAULT_QUANTIZED_KINDS) if g.name not in self.groups]
        if missing:
            raise RecipeError(f"recipe assigns no bits to {len(missing)} group(s), e.g. {missing[:3]}; give each "
                              "a bit width or null (keep original precision)")


def _quantizer(where: str, section: dict[str, Any]) -> QuantSettings:
    try:
        return QuantSettings(**section)
    except QuantConfigError as exc:
        raise RecipeError(f"{where}: quantizer: {exc}") from exc


def _section(where: str, data: dict[str, Any], key: str, kind: type) -> dict[str, Any]:
    section = data[key]
    if not isinstance(section, dict):
        raise RecipeError(f"{where}: {key!r} must be a mapping, got {section!r}")
    required = [f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING]
    _check_keys(f"{where}: {key}", section, [f.name for f in fields(kind)], required)
    return section


def _mapping(where: str, data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: {key!r} must be a mapping, got {value!r}")
    return dict(value)


def _numbers(where: str, data: dict[str, Any], key: str) -> dict[str, float]:
    """A mapping of name -> finite number (`achieved`, `kl`); null values are kept as None."""
    value = _mapping(where, data, key)
    for name, number in value.items():
        if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)
                                   or not math.isfinite(number)):
            raise RecipeError(f"{where}: {key}.{name} must be a finite number, got {number!r}")
    return value


def _groups(where: str, groups: Any) -> dict[str, OptionKey]:
    if not isinstance(groups, dict) or not groups:
        raise RecipeError(f"{where}: 'groups' must be a non-empty mapping of group name to bits")
    return {str(name): str(bits) if isinstance(bits, str) else bits for name, bits in groups.items()}
