"""Quantization options beyond bits: a group may pick its width, group size and method together.

An option is named by a label, `<method>-b<bits>-g<group size>` (e.g. `gptq-b4-g32`). The settings that
are not part of the label (symmetry, clip search) come from the settings shared by the whole recipe, so
a label plus those settings is exactly one `QuantConfig`, i.e. one variant folder. Labels are plain
strings, so an assignment that holds them stays JSON and YAML as it is (Optuna stores it as a user
attribute, a recipe writes it as is); a plain integer still means "that width of the shared settings".

The user's option set is a list of families, `<method>-g<size>` (`rtn-g32 rtn-g128 gptq-g64`), each
crossed with the measured widths; a full label (`rtn-b4-g32`) adds that one option only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from mixprec.core.errors import QuantConfigError
from mixprec.quant.base import QuantConfig, QuantSettings

__all__ = ["OptionKey", "option_label", "is_option_label", "option_config", "option_width", "option_family",
           "parse_families", "option_configs"]

#: A group's choice: a width of the shared settings (int), an option label (str) or None (original precision).
OptionKey = int | str | None

_LABEL = re.compile(r"(?P<method>[a-z][a-z0-9_]*(?:-[a-z][a-z0-9_]*)*?)-b(?P<bits>\d+)-g(?P<group>\d+)")
_FAMILY = re.compile(r"(?P<method>[a-z][a-z0-9_]*(?:-[a-z][a-z0-9_]*)*?)-g(?P<group>\d+)")
_EXAMPLE = "e.g. rtn-g32, gptq-g64 (a family, crossed with the widths) or rtn-b4-g32 (one option)"


def option_label(config: QuantConfig) -> str:
    """The label of `config` as an option (its method, width and group size)."""
    return f"{config.method}-b{config.bits}-g{config.group_size}"


def is_option_label(value: object) -> bool:
    return isinstance(value, str) and _LABEL.fullmatch(value) is not None


def option_config(option: int | str, shared: QuantSettings) -> QuantConfig:
    """The `QuantConfig` of `option` under the recipe's `shared` settings (a plain width: those settings)."""
    if isinstance(option, bool) or not isinstance(option, int | str):
        raise QuantConfigError(f"option {option!r} is neither a bit width nor an option label ({_EXAMPLE})")
    if isinstance(option, int):
        return shared.config(option)
    found = _LABEL.fullmatch(option)
    if found is None:
        raise QuantConfigError(f"option {option!r} is not a label <method>-b<bits>-g<group size> ({_EXAMPLE})")
    settings = replace(shared.settings, method=found["method"], group_size=int(found["group"]))
    return settings.config(int(found["bits"]))


def option_width(option: OptionKey) -> int:
    """The bit width of an option (16 for None, the original precision's width), for width rules such as
    floors, ceilings and exllamav3's `--hq` promotions."""
    if option is None:
        return 16
    if isinstance(option, int):
        return option
    found = _LABEL.fullmatch(option)
    if found is None:
        raise QuantConfigError(f"option {option!r} is not a label <method>-b<bits>-g<group size> ({_EXAMPLE})")
    return int(found["bits"])


def option_family(option: int | str, shared: QuantSettings) -> QuantSettings:
    """The settings of `option` without its width (the family it belongs to)."""
    return option_config(option, shared).settings


def _family(spec: str, shared: QuantSettings) -> QuantSettings:
    found = _FAMILY.fullmatch(spec)
    if found is None:
        raise QuantConfigError(f"--options {spec!r} is not <method>-g<group size> or <method>-b<bits>-g<size> "
                               f"({_EXAMPLE})")
    return replace(shared.settings, method=found["method"], group_size=int(found["group"]))


def parse_families(specs: Iterable[str], shared: QuantSettings) -> tuple[QuantSettings, ...]:
    """`["rtn-g32", "gptq-g64"]` -> one `QuantSettings` per family (shared symmetry and clip settings);
    a full label stands for its own family here, its width is chosen by `option_configs`."""
    families: list[QuantSettings] = []
    for spec in specs:
        label = _LABEL.fullmatch(spec)
        family = option_family(spec, shared) if label else _family(spec, shared)
        if family not in families:
            families.append(family)
    if not families:
        raise QuantConfigError(f"--options needs at least one option family ({_EXAMPLE})")
    return tuple(families)


def option_configs(families: Sequence[QuantSettings], widths: Sequence[int]) -> list[QuantConfig]:
    """Every family at every width it supports, in family order (the variants an option set needs)."""
    configs = []
    for family in families:
        for bits in widths:
            try:
                configs.append(family.config(bits))
            except QuantConfigError as exc:
                raise QuantConfigError(f"option family {family.method}-g{family.group_size}: {exc}") from exc
    return configs

