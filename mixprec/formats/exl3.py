"""exllamav3 override YAML: write a recipe as `sources` / `overrides`, and read one back into group bits.

exllamav3's `util/recompile.py -or FILE` (and `eval/model_diff.py -or`) builds one checkpoint from
several uniform quants by taking each tensor from the source whose override key matches its name.
The semantics implemented here follow `exllamav3/loader/safetensors.py` (VariantSafetensorsCollection)
and `util/recompile.py` exactly (FIELD.md §5.1), because a pattern that matches differently there
than here would silently compile another recipe:

* a key is a glob where only `*` is special: a run of `*` collapses to one, `*` becomes `.*` (it
  crosses dots), everything else is literal, and the key must **fullmatch** the whole tensor name
  (`model.layers.3.self_attn.q_proj.trellis`), so `model.layers.1.*` does not match layer 10;
* the YAML becomes dicts, so a duplicate source id or override key means the **last one wins**;
* keys are grouped by source directory in order of first appearance and each group is prepended to
  the lookup list, so when keys of two sources overlap, **the source added later wins**;
* a tensor no key matches comes from the base quant (`-i`).

The writer never relies on precedence: it emits one small set of anchored keys per group
(`model.layers.3.self_attn.*`, or `model.layers.3.mlp.experts.*.gate_proj.*` where a single prefix
would reach another group) and checks that no key reaches a module of another group.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_write_text, dump_yaml, parse_yaml, read_json, read_yaml
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS, GroupKind, family_for
from mixprec.model.modelmap import Group, ModelMap, WeightRef, nearest_names

__all__ = [
    "Exl3YamlError",
    "Exl3Source",
    "Exl3Override",
    "Exl3Overrides",
    "compile_star_globs",
    "group_modules",
    "group_patterns",
    "recipe_to_exl3",
    "exl3_to_groups",
    "source_bits",
]

#: Suffix used to probe a module: exllamav3 stores a quantized linear K as K.trellis, K.suh, K.svh.
_PROBE_SUFFIX = ".trellis"

log = logging.getLogger(__name__)


class Exl3YamlError(MixprecError):
    """An exllamav3 override YAML is malformed or does not fit the model."""


def compile_star_globs(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex for a list of exllamav3 globs, exactly as `VariantSafetensorsCollection.compile_star_globs`."""
    alternatives: list[str] = []
    seen: set[str] = set()
    for raw in patterns:
        pattern = re.sub(r"\*+", "*", raw.strip())
        if pattern in seen:
            continue
        seen.add(pattern)
        if pattern == "*":
            return re.compile(r"^.*$")
        alternatives.append(".*".join(map(re.escape, pattern.split("*"))))
    if not alternatives:
        return re.compile(r"^\b\B$")  # matches nothing
    return re.compile(r"^(?:" + "|".join(alternatives) + r")$")


@dataclass(frozen=True)
class Exl3Source:
    """One quantized model folder an override can point to."""

    id: str | int
    model_dir: str


@dataclass(frozen=True)
class Exl3Override:
    """Tensors whose full name fullmatches `key` come from source `source`."""

    key: str
    source: str | int


def _check_mapping(where: str, item: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise Exl3YamlError(f"{where}: expected a mapping with keys {list(keys)}, got {item!r}")
    for key in item:
        if key not in keys:
            raise Exl3YamlError(f"{where}: unknown key {key!r}; nearest valid: "
                                f"{', '.join(nearest_names(str(key), keys))}")
    for key in keys:
        if key not in item:
            raise Exl3YamlError(f"{where}: required key {key!r} is missing")
    return item


@dataclass(frozen=True)
class Exl3Overrides:
    """The whole override file: `sources` and `overrides`, in file order."""

    sources: tuple[Exl3Source, ...]
    overrides: tuple[Exl3Override, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        ids = [s.id for s in self.sources]
        for override in self.overrides:
            if override.source not in ids:
                raise Exl3YamlError(
                    f"override {override.key!r} names source {override.source!r}, which is not among the sources; "
                    f"nearest: {', '.join(nearest_names(str(override.source), [str(i) for i in ids]))}")

    # -- exllamav3 lookup ---------------------------------------------------------------------------
    @cached_property
    def _lookup(self) -> list[tuple[re.Pattern[str], str]]:
        """(regex, model_dir) in the order exllamav3 tries them: last-added source first."""
        source_dir = {s.id: s.model_dir for s in self.sources}  # duplicate id: last wins
        key_dir = {o.key: source_dir[o.source] for o in self.overrides}  # duplicate key: last wins
        collections: dict[str, list[str]] = {}
        for key, model_dir in key_dir.items():
            collections.setdefault(model_dir, []).append(key)
        lookup: list[tuple[re.Pattern[str], str]] = []
        for model_dir, keys in collections.items():
            lookup = [(compile_star_globs(keys), model_dir), *lookup]  # add_stc prepends
        return lookup

    def resolve(self, tensor_name: str) -> str | None:
        """The source folder exllamav3 would read `tensor_name` from, or None for the base quant."""
        for regex, model_dir in self._lookup:
            if regex.fullmatch(tensor_name):
                return model_dir
        return None

    # -- YAML ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"sources": [{"id": s.id, "model_dir": s.model_dir} for s in self.sources],
                "overrides": [{"key": o.key, "source": o.source} for o in self.overrides]}

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict(), width=200)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, where: str = "override YAML") -> Exl3Overrides:
        top = _check_mapping(where, data, ("sources", "overrides"))
        if not isinstance(top["sources"], list) or not isinstance(top["overrides"] or [], list):
            raise Exl3YamlError(f"{where}: 'sources' and 'overrides' must be lists")
        sources = tuple(Exl3Source(**_check_mapping(f"{where}: sources[{i}]", s, ("id", "model_dir")))
                        for i, s in enumerate(top["sources"]))
        overrides = tuple(Exl3Override(**_check_mapping(f"{where}: overrides[{i}]", o, ("key", "source")))
                          for i, o in enumerate(top["overrides"] or []))
        for i, o in enumerate(overrides):
            if not isinstance(o.key, str) or not o.key.strip():
                raise Exl3YamlError(f"{where}: overrides[{i}].key must be a non-empty string, got {o.key!r}")
        return cls(sources, overrides)

    @classmethod
    def from_yaml(cls, text: str, where: str = "override YAML") -> Exl3Overrides:
        return cls.from_dict(parse_yaml(text, where, Exl3YamlError), where)

    @classmethod
    def load(cls, path: str | Path) -> Exl3Overrides:
        return cls.from_dict(*read_yaml(path, "override YAML", Exl3YamlError))


# -- module names and patterns -----------------------------------------------------------------------

def _module_name(model_map: ModelMap, group: Group, ref: WeightRef) -> str:
    """The per-module checkpoint name exllamav3 uses (per expert even when the checkpoint is fused)."""
    if ref.fused_on_disk and ref.expert is not None and group.layer is not None:
        projection = "down" if ref.param.endswith("down_proj") else "gate" if (ref.rows or (0,))[0] == 0 else "up"
        key = family_for(model_map.model_type).expert_key(group.layer, projection, ref.expert)
    else:
        key = ref.key
    return key.removesuffix(".weight")


def group_modules(model_map: ModelMap) -> dict[str, tuple[str, ...]]:
    """Group name -> module names (on-disk key without `.weight`) for every group of the map."""
    return {g.name: tuple(dict.fromkeys(_module_name(model_map, g, r) for r in g.weights)) for g in model_map.groups}


class _Universe:
    """Every module name of the model, sorted, so a pattern is checked only against names sharing its
    literal prefix (big MoE models have tens of thousands of expert modules)."""

    def __init__(self, modules: Mapping[str, tuple[str, ...]]) -> None:
        self.owner = {m: name for name, mods in modules.items() for m in mods}
        self.sorted = sorted(self.owner)

    def reaches_other(self, pattern: str, group: str) -> bool:
        """Whether `pattern` fullmatches a module (probed as `module.trellis`) of a group other than `group`."""
        literal = pattern.split("*", 1)[0]
        regex = compile_star_globs([pattern])
        # candidates: names the literal prefix starts (contiguous in sorted order) and names that are
        # themselves a prefix of the literal (the literal then runs on into the probe suffix)
        start = bisect.bisect_left(self.sorted, literal)
        candidates = list(itertools.takewhile(lambda m: m.startswith(literal), self.sorted[start:]))
        candidates += [literal[:i] for i in range(1, len(literal)) if literal[:i] in self.owner]
        return any(self.owner[m] != group and regex.fullmatch(m + _PROBE_SUFFIX) for m in candidates)


def _patterns_for(group: str, modules: tuple[str, ...], universe: _Universe) -> list[str]:
    """The most specific single prefix key if it is exclusive, else per-module keys with `*` put into
    every segment position where that keeps all keys exclusive (expert indices, typically)."""
    split = [tuple(m.split(".")) for m in modules]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if common and not universe.reaches_other(".".join(common) + ".*", group):
        return [".".join(common) + ".*"]
    patterns = list(dict.fromkeys(split))
    for position in range(max(len(p) for p in patterns) - 1, -1, -1):
        merged = list(dict.fromkeys(p[:position] + ("*",) + p[position + 1 :] if len(p) > position else p
                                    for p in patterns))
        if len(merged) < len(patterns) and not any(
                universe.reaches_other(".".join(p) + ".*", group) for p in merged):
            patterns = merged
    return [".".join(p) + ".*" for p in patterns]


def group_patterns(model_map: ModelMap, names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Non-overlapping exllamav3 keys per group (see `_patterns_for`), checked to cover the group."""
    modules = group_modules(model_map)
    universe = _Universe(modules)
    wanted = list(modules) if names is None else list(names)
    result: dict[str, list[str]] = {}
    for name in wanted:
        model_map.group(name)  # unknown names raise with suggestions
        result[name] = _patterns_for(name, modules[name], universe)
        regex = compile_star_globs(result[name])
        missing = [m for m in modules[name] if not regex.fullmatch(m + _PROBE_SUFFIX)]
        if missing:  # cannot happen unless a module name contains '*'
            raise Exl3YamlError(f"keys {result[name]} for group {name!r} miss modules {missing[:3]}")
    return result


# -- recipe <-> override YAML ------------------------------------------------------------------------

def recipe_to_exl3(groups: Mapping[str, int | None], model_map: ModelMap, sources: Mapping[int, str | Path],
                   base_bits: int | None = None) -> Exl3Overrides:
    """Override YAML for a group -> bits map, with `sources[bits]` as each width's quant folder.

    Groups at `base_bits` are left to the base quant (`recompile.py -i`), as exllamav3's optimizer
    does; with `base_bits=None` every group is listed. exllamav3 has no unquantized source, so a
    group kept at original precision (null) cannot be expressed and is an error.
    """
    used = sorted({b for b in groups.values() if b is not None and b != base_bits})
    missing = [b for b in used if b not in sources]
    if missing:
        raise Exl3YamlError(f"no source folder for {missing} bits; give one per width used by the recipe "
                            f"(have {sorted(sources)})")
    nulls = [n for n, b in groups.items() if b is None]
    if nulls:
        raise Exl3YamlError(f"group(s) {nulls[:3]} are kept at original precision (null), which an exllamav3 "
                            "override cannot express; pin them to a bit width instead")
    _warn_mixed_experts(groups, model_map)
    ids = {b: f"{b}bit" for b in used}
    listed = [n for n in groups if groups[n] != base_bits]
    patterns = group_patterns(model_map, listed)
    overrides = tuple(Exl3Override(key, ids[groups[name]])  # type: ignore[index]
                      for name in listed for key in patterns[name])
    return Exl3Overrides(tuple(Exl3Source(ids[b], str(sources[b])) for b in used), overrides)


def _warn_mixed_experts(groups: Mapping[str, int | None], model_map: ModelMap) -> None:
    """exllamav3's fused MoE path (`modules/multilinear.py`) asserts one width for all experts of a layer's
    projection (FIELD.md §2.1): a per-expert recipe compiles with mixprec, but say which layers would break."""
    widths: dict[tuple[int, str], set[int | None]] = {}
    for group in model_map.select([GroupKind.ROUTED_EXPERTS]):
        if group.name in groups and group.layer is not None:
            last = group.name.rpartition(".")[2]  # `expert-fine` groups end in their projection
            widths.setdefault((group.layer, "" if last.isdigit() else last), set()).add(groups[group.name])
    mixed = sorted({layer for (layer, _), found in widths.items() if len(found) > 1})
    if mixed:
        log.warning("layers %s give their routed experts different widths; exllamav3's fused MoE kernels need one "
                    "width per layer and projection, so load this override in exllamav3 only if your version "
                    "accepts it (mixprec's compiled format does); search at --granularity fine for exllamav3",
                    mixed[:8])


def exl3_to_groups(overrides: Exl3Overrides, model_map: ModelMap, bits_of_dir: Mapping[str, int],
                   base_bits: int) -> dict[str, int]:
    """Group -> bits that exllamav3 would compile from `overrides` (tensors matching no key: `base_bits`).

    A group whose modules resolve to different widths cannot be represented at this granularity and
    is an error naming the group and the finer granularity to use.
    """
    modules = group_modules(model_map)
    result: dict[str, int] = {}
    for group in model_map.select(DEFAULT_QUANTIZED_KINDS):
        found: set[int] = set()
        for module in modules[group.name]:
            model_dir = overrides.resolve(module + _PROBE_SUFFIX)
            if model_dir is not None and model_dir not in bits_of_dir:
                raise Exl3YamlError(f"source folder {model_dir!r} has no known bit width; known: "
                                    f"{', '.join(nearest_names(model_dir, list(bits_of_dir)))}")
            found.add(base_bits if model_dir is None else bits_of_dir[model_dir])
        if len(found) != 1:
            raise Exl3YamlError(f"group {group.name!r} gets several widths {sorted(found)} from the override YAML; "
                                f"read it at a finer granularity than {model_map.granularity.value!r}")
        result[group.name] = found.pop()
    _warn_unmatched(overrides, [m for names in modules.values() for m in names])
    return result


def _warn_unmatched(overrides: Exl3Overrides, modules: list[str]) -> None:
    """An override key matching no quantized tensor (a typo, another model's names) would silently leave
    its tensors at the base width: say so."""
    probes = [m + _PROBE_SUFFIX for m in modules]
    for override in overrides.overrides:
        pattern = compile_star_globs([override.key])
        if not any(pattern.fullmatch(p) for p in probes):
            log.warning("override key %r matches no quantized tensor of this model; the tensors it was meant for "
                        "get the base width", override.key)


def source_bits(model_dir: str | Path) -> int:
    """Bit width of a quant folder: a mixprec variant (manifest.json) or an EXL3 quant (config.json)."""
    path = Path(model_dir)
    if (path / "manifest.json").exists():
        return int(read_json(path / "manifest.json")["quant_config"]["bits"])  # only the width: any manifest
    if (path / "config.json").exists():
        bits = read_json(path / "config.json").get("quantization_config", {}).get("bits")
        if bits is not None and float(bits).is_integer():
            return int(bits)
        raise Exl3YamlError(f"{path / 'config.json'}: quantization_config.bits is {bits!r}, not an integer width; "
                            "pass the widths explicitly")
    raise Exl3YamlError(f"{path} is neither a mixprec variant (manifest.json) nor an EXL3 quant (config.json)")
