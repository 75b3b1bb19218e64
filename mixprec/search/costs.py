"""Exact bit accounting, budgets and per-group constraints for the recipe search.

Costs come from the variants' manifests (`Variant.storage_bits(group)`): codes, fp16 scales and any
zero points, with a partial last group paying a full scale. Nothing here estimates `bits + 16/G`,
because input dimensions that are not a multiple of the group size make that estimate wrong. A
group kept at original precision (`null` in a recipe) is counted at 16 bits per weight, the bf16/fp16
size it ships with.

The budget is over the searched weights only (the kinds the variants quantized: attention, dense
MLP, shared and routed experts by default). Embeddings, head, routers and norms are outside the bpw
figure, as in exllamav3 and FIELD.md §9.4. A bpw budget is `bpw × params` bits; a GiB budget is the
size of those weights in GiB (2^30 bytes).

Constraints name groups by selector: an exact group name (`layers.0.attn`), a kind
(`attention`, `routed_experts`, ...; short forms `attn`, `experts`, `shared`, `mlp` too) or a
`*` glob over group names (`layers.0.*`). Pins fix a group; floors and ceilings bound it. When a
budget cannot be met, the error gives the smallest and largest achievable size under the constraints.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mixprec.core.errors import MixprecError
from mixprec.formats.recipe import Budget
from mixprec.model.arch import GroupKind
from mixprec.model.modelmap import Group, ModelMap, nearest_names
from mixprec.quant import QuantConfig, storage_bits
from mixprec.quant.options import OptionKey, is_option_label, option_width
from mixprec.quant.variants import Variant

__all__ = [
    "NULL_BITS_PER_WEIGHT",
    "BudgetError",
    "InfeasibleBudgetError",
    "Option",
    "GroupCost",
    "CostTable",
    "Constraints",
    "parse_settings",
    "budget_limit_bits",
    "check_feasible",
]

#: Bits per weight of a group kept at original precision (bf16/fp16 as shipped).
NULL_BITS_PER_WEIGHT = 16
_GIB_BITS = 8 * 2**30
_SHORT_KINDS = {"attn": GroupKind.ATTENTION, "experts": GroupKind.ROUTED_EXPERTS,
                "shared": GroupKind.SHARED_EXPERTS, "mlp": GroupKind.DENSE_MLP}

#: A group's choice: a width (int), an option label such as `gptq-b4-g32` (`--options`), or None.
Option = OptionKey


class BudgetError(MixprecError):
    """A budget or constraint is malformed or names groups that do not exist."""


class InfeasibleBudgetError(BudgetError):
    """No assignment within the constraints meets the budget."""


@dataclass(frozen=True)
class GroupCost:
    """One searchable group and its exact storage at every option (width or option label -> storage bits)."""

    name: str
    kind: GroupKind
    layer: int | None
    params: int
    bits: dict[Option, int]

    def cost(self, option: Option) -> int:
        if option is None:
            return NULL_BITS_PER_WEIGHT * self.params
        try:
            return self.bits[option]
        except KeyError:
            raise BudgetError(f"group {self.name!r} has no {option}-bit variant; available: "
                              f"{sorted(self.bits, key=str)} (quantize it with `mixprec quantize --bits` "
                              "and the same --options)") from None


@dataclass(frozen=True)
class CostTable:
    """Exact costs of every searchable group, in model-map order, from the variants' manifests."""

    groups: tuple[GroupCost, ...]
    variant_ids: dict[Option, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {g.name: g for g in self.groups})
        if not self.groups:
            raise BudgetError("no searchable groups: the variants quantized none of the model map's groups")

    @classmethod
    def from_variants(cls, model_map: ModelMap, variants: Mapping[Option, Variant]) -> CostTable:
        """Costs of the groups every variant quantized (the variants' `kinds`), read from their manifests;
        the variants are keyed by width, or by option label when the search picks among options."""
        if not variants:
            raise BudgetError("no variants given; run `mixprec quantize --bits 2 3 4 5 6 8` first")
        kinds = {GroupKind(k) for v in variants.values() for k in v.manifest.kinds}
        groups: list[Group] = model_map.select(kinds)
        costs = tuple(GroupCost(g.name, g.kind, g.layer, g.num_params,
                                {key: variants[key].storage_bits(g) for key in sorted(variants, key=_order)})
                      for g in groups)
        return cls(costs, {key: variants[key].manifest.variant_id for key in sorted(variants, key=_order)})

    @classmethod
    def from_configs(cls, model_map: ModelMap, configs: Mapping[Option, QuantConfig],
                     kinds: Iterable[GroupKind]) -> CostTable:
        """The same table computed from quantizer settings (`mixprec.quant.storage_bits`, exact per matrix),
        for validating a budget before any variant exists; the search itself uses `from_variants`."""
        ordered = sorted(configs.items(), key=lambda kv: _order(kv[0]))
        costs = tuple(GroupCost(g.name, g.kind, g.layer, g.num_params,
                                {b: sum(storage_bits(c, r.shape) for r in g.weights) for b, c in ordered})
                      for g in model_map.select(kinds))
        return cls(costs, {b: c.variant_id for b, c in ordered})

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def levels(self) -> list[Option]:
        """Options (widths or labels) available to every group."""
        return sorted(set.intersection(*(set(g.bits) for g in self.groups)), key=_order)

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    def group(self, name: str) -> GroupCost:
        try:
            return self._by_name[name]  # type: ignore[attr-defined,no-any-return]
        except KeyError:
            raise BudgetError(f"unknown group {name!r}; nearest: {', '.join(nearest_names(name, self.names))}") \
                from None

    def storage_bits(self, assignment: Mapping[str, Option]) -> int:
        """Exact size of an assignment that names every group."""
        missing = [n for n in self.names if n not in assignment]
        if missing:
            raise BudgetError(f"assignment gives no bits to {len(missing)} group(s), e.g. {missing[:3]}")
        return sum(self.group(n).cost(assignment[n]) for n in self.names)

    def bpw(self, assignment: Mapping[str, Option]) -> float:
        return self.storage_bits(assignment) / self.params

    def achieved(self, assignment: Mapping[str, Option]) -> dict[str, float]:
        """The recipe's `achieved` block: bpw (scales counted), GiB, exact storage bits and weight count."""
        bits = self.storage_bits(assignment)
        return {"bpw": round(bits / self.params, 6), "gib": round(bits / _GIB_BITS, 9),
                "storage_bits": bits, "params": self.params}

    def matching(self, selector: str) -> list[str]:
        """Group names a selector picks: exact name, kind (or short kind), or `*` glob over names."""
        if selector in self._by_name:  # type: ignore[attr-defined]
            return [selector]
        kind = _SHORT_KINDS.get(selector) or (GroupKind(selector) if selector in GroupKind._value2member_map_
                                              else None)
        if kind is not None:
            return [g.name for g in self.groups if g.kind is kind]
        if "*" in selector:
            return [n for n in self.names if fnmatch.fnmatchcase(n, selector)]
        return []


def _order(option: Option) -> tuple[int, str]:
    """Sort key of options: by width, then by label (widths and labels never mix in one table)."""
    return option_width(option), str(option)


def budget_limit_bits(budget: Budget, table: CostTable) -> int:
    """The largest storage (bits) the budget allows over the searched weights."""
    if budget.bpw is not None:
        return math.floor(budget.bpw * table.params + 1e-6)
    return math.floor(float(budget.gib) * _GIB_BITS + 1e-6)  # type: ignore[arg-type]


def parse_settings(items: Iterable[str], flag: str, allow_null: bool = False) -> dict[str, Option]:
    """`["attention=5", "layers.0.*=8"]` -> {selector: bits}; errors name the flag and the bad item. A pin may
    name an option label (`attention=gptq-b6-g32`) when the search picks among options."""
    result: dict[str, Option] = {}
    for item in items:
        selector, sep, value = item.partition("=")
        if not sep or not selector or not value:
            raise BudgetError(f"{flag} {item!r}: expected SELECTOR=BITS, e.g. {flag} attention=5")
        if allow_null and value.lower() in ("null", "none"):
            result[selector] = None
            continue
        if allow_null and is_option_label(value):
            result[selector] = value
            continue
        try:
            result[selector] = int(value)
        except ValueError:
            raise BudgetError(f"{flag} {item!r}: bits {value!r} is not an integer") from None
    return result


@dataclass(frozen=True)
class Constraints:
    """Pins (exact option), floors and ceilings (bit bounds) by selector; later selectors override earlier."""

    pins: dict[str, Option] = field(default_factory=dict)  # width, option label or None
    floors: dict[str, int] = field(default_factory=dict)
    ceilings: dict[str, int] = field(default_factory=dict)

    def options(self, table: CostTable) -> dict[str, tuple[Option, ...]]:
        """Allowed options per group, cheapest first; an error names any selector or group left empty."""
        floor = self._resolve(table, self.floors, "--floor")
        ceiling = self._resolve(table, self.ceilings, "--ceiling")
        pinned = self._resolve(table, self.pins, "--pin")
        allowed: dict[str, tuple[Option, ...]] = {}
        for g in table.groups:
            if g.name in pinned:
                option = pinned[g.name]
                g.cost(option)  # unknown width -> error naming the group and the widths available
                allowed[g.name] = (option,)
                continue
            lo, hi = floor.get(g.name, 0), ceiling.get(g.name, 99)
            allowed[g.name] = tuple(b for b in sorted(g.bits, key=g.cost) if lo <= option_width(b) <= hi)
            if not allowed[g.name]:
                raise BudgetError(f"group {g.name!r}: no width satisfies floor {lo} and ceiling {hi}; "
                                  f"available widths: {sorted(g.bits)}")
        return allowed

    @staticmethod
    def _resolve(table: CostTable, settings: Mapping[str, Option], flag: str) -> dict[str, Option]:
        resolved: dict[str, Option] = {}
        for selector, value in settings.items():
            names = table.matching(selector)
            if not names:
                valid = table.names + [k.value for k in GroupKind] + list(_SHORT_KINDS)
                raise BudgetError(f"{flag} {selector}={value}: selector {selector!r} matches no searchable group; "
                                  f"nearest: {', '.join(nearest_names(selector, valid))}")
            resolved.update(dict.fromkeys(names, value))
        return resolved


def check_feasible(table: CostTable, options: Mapping[str, tuple[Option, ...]], limit_bits: int,
                   budget: Budget) -> None:
    """Raise `InfeasibleBudgetError` naming the smallest and largest achievable sizes if the cheapest
    allowed assignment already exceeds the budget."""
    lowest = sum(min(table.group(n).cost(o) for o in opts) for n, opts in options.items())
    if lowest <= limit_bits:
        return
    highest = sum(max(table.group(n).cost(o) for o in opts) for n, opts in options.items())
    asked = f"{budget.bpw} bpw" if budget.bpw is not None else f"{budget.gib} GiB"
    raise InfeasibleBudgetError(
        f"budget {asked} cannot be met: under the given pins/floors/ceilings the searched weights "
        f"({table.params:,} params) take between {lowest / table.params:.4f} and {highest / table.params:.4f} bpw "
        f"({lowest / _GIB_BITS:.6f}–{highest / _GIB_BITS:.6f} GiB); raise the budget to at least "
        f"{math.ceil(lowest / table.params * 1e4) / 1e4} bpw or relax the constraints")
