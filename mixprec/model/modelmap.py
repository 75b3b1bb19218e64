"""The model map: a model's quantizable weights as named groups, bridging in-memory and on-disk names.

Every later stage speaks in groups (`layers.3.attn`, `layers.3.experts.down`, `layers.3.experts.5`).
A group owns `WeightRef`s, one per 2-D matrix as the checkpoint stores it. Each ref knows both its
on-disk key (`model.layers.3.mlp.experts.5.gate_proj.weight`) and where the same matrix lives in the
transformers v5 model (rows `[:I]` of expert 5 in the fused `mlp.experts.gate_up_proj`), so a recipe
written against checkpoint keys applies to the in-memory model and back.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch

from mixprec.core.errors import MixprecError, UnsupportedArchitectureError
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS, ArchFamily, GroupKind, ParamRule, family_for

__all__ = ["DEFAULT_GRANULARITY",
    "Granularity",
    "WeightRef",
    "Group",
    "ModelMap",
    "build_model_map",
    "nearest_names",
]

_SHORT = {
    GroupKind.ATTENTION: "attn",
    GroupKind.DENSE_MLP: "mlp",
    GroupKind.SHARED_EXPERTS: "shared",
    GroupKind.ROUTED_EXPERTS: "experts",
    GroupKind.ROUTER: "router",
}
_KIND_ORDER = {kind: i for i, kind in enumerate(GroupKind)}
_PART_ORDER = {"q": 0, "kv": 1, "o": 2, "gate_up": 3, "down": 4}


class Granularity(StrEnum):
    """How finely weights are grouped: per layer block, per projection, per routed expert, or per routed expert
    and projection (`expert-fine`: gate+up and down of each expert apart)."""

    LAYER = "layer"
    FINE = "fine"
    EXPERT = "expert"
    EXPERT_FINE = "expert-fine"

    @property
    def per_expert(self) -> bool:
        """Whether each routed expert is a group of its own (or two)."""
        return self in (Granularity.EXPERT, Granularity.EXPERT_FINE)


#: the one default of every stage (inspect, measure, search, compile, demo): q | kv | o and gate+up | down per
#: layer is where sensitivities differ most, at a measuring cost of a few groups per layer
DEFAULT_GRANULARITY = Granularity.FINE.value


@dataclass(frozen=True)
class WeightRef:
    """One 2-D matrix [out, in] as stored in the checkpoint, and where it lives in memory.

    `expert` indexes dim 0 of a fused 3-D parameter and `rows` slices that expert's matrix
    (gate is rows `[:I]` and up is rows `[I:]` of `gate_up_proj`). When the checkpoint itself stores
    fused tensors (`fused_on_disk`), the same slicing applies to the on-disk tensor.
    """

    key: str
    param: str
    shape: tuple[int, int]
    expert: int | None = None
    rows: tuple[int, int] | None = None
    fused_on_disk: bool = False

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def unit(self) -> str:
        """Unique name of this matrix in variant files (the checkpoint key unless the key is fused)."""
        if not self.fused_on_disk:
            return self.key
        start, stop = self.rows if self.rows is not None else (0, self.shape[0])
        return f"{self.key}.e{self.expert}.r{start}-{stop}"

    def slice_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """The view of this matrix inside an in-memory parameter tensor (writable in place)."""
        view = tensor if self.expert is None else tensor[self.expert]
        if self.rows is not None:
            view = view[self.rows[0] : self.rows[1]]
        return view

    def slice_disk(self, tensor: torch.Tensor) -> torch.Tensor:
        """This matrix inside the tensor stored under `key` on disk."""
        return self.slice_memory(tensor) if self.fused_on_disk else tensor


@dataclass(frozen=True)
class Group:
    """A set of matrices that always gets the same quantization setting."""

    name: str
    kind: GroupKind
    layer: int | None
    part: str | None
    weights: tuple[WeightRef, ...]

    @property
    def num_params(self) -> int:
        return sum(ref.numel for ref in self.weights)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ref.key for ref in self.weights))

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ref.param for ref in self.weights))


@dataclass(frozen=True)
class ModelMap:
    """All weight groups of one model at one granularity, in layer order."""

    model_type: str
    family: str
    num_layers: int
    granularity: Granularity
    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {g.name: g for g in self.groups})

    def group(self, name: str) -> Group:
        """The group called `name`, or an error suggesting the nearest valid names."""
        try:
            return self._by_name[name]  # type: ignore[attr-defined]
        except KeyError:
            raise MixprecError(
                f"unknown group {name!r} for this {self.model_type} model at granularity "
                f"{self.granularity.value!r}; nearest: {', '.join(nearest_names(name, self.names()))}"
            ) from None

    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def select(self, kinds: Iterable[GroupKind] = DEFAULT_QUANTIZED_KINDS) -> list[Group]:
        """Groups of the given kinds (by default the ones quantized unless told otherwise)."""
        wanted = set(kinds)
        return [g for g in self.groups if g.kind in wanted]

    def num_params(self, kinds: Iterable[GroupKind] = DEFAULT_QUANTIZED_KINDS) -> int:
        return sum(g.num_params for g in self.select(kinds))


def nearest_names(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Closest spellings, for error messages; falls back to the first few candidates."""
    pool = list(candidates)
    return difflib.get_close_matches(name, pool, n=n, cutoff=0.3) or pool[:n]


def _expert_refs(family: ArchFamily, name: str, layer: int, rule: ParamRule,
                 shape: tuple[int, ...]) -> list[WeightRef]:
    experts, rows, cols = shape
    refs: list[WeightRef] = []
    for e in range(experts):
        if rule.part == "gate_up":
            half = rows // 2
            refs.append(WeightRef(family.expert_key(layer, "gate", e), name, (half, cols), e, (0, half)))
            refs.append(WeightRef(family.expert_key(layer, "up", e), name, (half, cols), e, (half, rows)))
        else:
            refs.append(WeightRef(family.expert_key(layer, "down", e), name, (rows, cols), e))
    return refs


def _refs_for(family: ArchFamily, name: str, layer: int | None, rule: ParamRule,
              shape: tuple[int, ...]) -> list[WeightRef]:
    if rule.kind is GroupKind.ROUTED_EXPERTS:
        if len(shape) != 3 or layer is None:
            raise UnsupportedArchitectureError(
                f"{name}: routed experts must be a fused 3-D parameter [E, out, in] (transformers v5), got {shape}"
            )
        return _expert_refs(family, name, layer, rule, shape)
    if len(shape) != 2:
        raise UnsupportedArchitectureError(f"{name}: expected a 2-D weight, got shape {shape}")
    return [WeightRef(family.checkpoint_name(name), name, (shape[0], shape[1]))]


def _check_disk_keys(refs: list[WeightRef], checkpoint_keys: Collection[str]) -> list[WeightRef]:
    """Point refs at fused on-disk tensors when the checkpoint stores experts fused; fail on missing keys."""
    fixed: list[WeightRef] = []
    missing: list[str] = []
    for ref in refs:
        if ref.key in checkpoint_keys:
            fixed.append(ref)
        elif ref.expert is not None and ref.param in checkpoint_keys:
            fixed.append(WeightRef(ref.param, ref.param, ref.shape, ref.expert, ref.rows, fused_on_disk=True))
        else:
            missing.append(ref.key)
    if missing:
        raise UnsupportedArchitectureError(
            f"{len(missing)} weight(s) the architecture table expects are not in the checkpoint, e.g. "
            f"{missing[:3]}; the checkpoint uses other key names: extend the family's expert_keys or "
            "checkpoint_renames in mixprec.model.arch.FAMILIES"
        )
    return fixed


def _group_name(kind: GroupKind, layer: int | None, part: str | None) -> str:
    if layer is None:
        return "embed" if kind is GroupKind.EMBEDDING else "lm_head"
    base = f"layers.{layer}.{_SHORT[kind]}"
    return base if part is None else f"{base}.{part}"


def _group_key(kind: GroupKind, layer: int | None, part: str, ref: WeightRef,
               granularity: Granularity) -> tuple[GroupKind, int | None, str | None]:
    if kind in (GroupKind.ROUTER, GroupKind.EMBEDDING, GroupKind.LM_HEAD):
        return kind, layer, None
    if granularity is Granularity.LAYER:
        return kind, layer, None
    if granularity is Granularity.EXPERT and kind is GroupKind.ROUTED_EXPERTS:
        return kind, layer, str(ref.expert)
    if granularity is Granularity.EXPERT_FINE and kind is GroupKind.ROUTED_EXPERTS:
        return kind, layer, f"{ref.expert}.{part}"
    return kind, layer, part


def _sort_key(item: tuple[GroupKind, int | None, str | None]) -> tuple[int, int, int, int]:
    kind, layer, part = item
    layer_order = -1 if kind is GroupKind.EMBEDDING else (10**9 if layer is None else layer)
    if part is None:
        part_order = -1
    elif part.isdigit():
        part_order = 100 + int(part)
    elif part.partition(".")[0].isdigit():  # expert-fine: `5.gate_up`, `5.down`
        expert, _, projection = part.partition(".")
        part_order = 100 + 10 * int(expert) + _PART_ORDER.get(projection, 9)
    else:
        part_order = _PART_ORDER.get(part, 50)
    return layer_order, _KIND_ORDER[kind], part_order, 0


def build_model_map(param_shapes: Mapping[str, tuple[int, ...]], model_type: str, num_layers: int,
                    checkpoint_keys: Collection[str] | None = None,
                    granularity: Granularity | str = Granularity.LAYER) -> ModelMap:
    """Classify every parameter of a model and assemble groups at `granularity`.

    `param_shapes` comes from `named_parameters()` (a meta-device model is enough, so big models need
    not be loaded). With `checkpoint_keys`, every on-disk key is verified to exist. A weight matrix
    that no rule recognises is an error rather than silently left out of every recipe. Empty weights
    (a dimension of 0, e.g. `shared_expert_intermediate_size: 0`) form no group: they would cost
    measurement jobs and search variables for zero bits.
    """
    family = family_for(model_type)
    granularity = Granularity(granularity)
    members: dict[tuple[GroupKind, int | None, str | None], list[WeightRef]] = defaultdict(list)
    unknown: list[str] = []
    for name, shape in param_shapes.items():
        if 0 in tuple(shape):  # a zero-width module (Qwen2-MoE saved with no shared expert) has nothing to quantize
            continue
        found = family.classify(name)
        if found is None:
            if len(shape) >= 2:
                unknown.append(name)
            continue
        layer, rule = found
        refs = _refs_for(family, name, layer, rule, tuple(shape))
        if checkpoint_keys is not None:
            refs = _check_disk_keys(refs, checkpoint_keys)
        for ref in refs:
            members[_group_key(rule.kind, layer, rule.part, ref, granularity)].append(ref)
    if unknown:
        raise UnsupportedArchitectureError(
            f"{model_type}: no rule classifies the weight(s) {unknown[:5]}; add a ParamRule for them to the "
            "family in mixprec.model.arch.FAMILIES"
        )
    groups = tuple(
        Group(_group_name(kind, layer, part), kind, layer, part, tuple(members[(kind, layer, part)]))
        for kind, layer, part in sorted(members, key=_sort_key)
    )
    return ModelMap(model_type, family.name, num_layers, granularity, groups)
