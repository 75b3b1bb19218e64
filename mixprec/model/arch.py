"""Per-architecture tables: which parameters are attention, experts, routers, and what they are called on disk.

transformers v5 normalises in-memory names across MoE families (routed experts are always the fused
3-D `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]), but checkpoints keep
per-expert keys whose spelling differs by family (Mixtral: `block_sparse_moe.experts.E.w1`). An
`ArchFamily` is pure data describing one family; adding a family means adding one entry to
`FAMILIES`, never a new code branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from mixprec.core.errors import UnsupportedArchitectureError

__all__ = [
    "GroupKind",
    "ParamRule",
    "ArchFamily",
    "FAMILIES",
    "DEFAULT_QUANTIZED_KINDS",
    "family_for",
    "supported_model_types",
]


class GroupKind(StrEnum):
    """What a tensor group does in the network; decides defaults and how groups are reported."""

    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    SHARED_EXPERTS = "shared_experts"
    ROUTED_EXPERTS = "routed_experts"
    ROUTER = "router"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"


#: Kinds quantized unless the user asks otherwise. Routers, embeddings and the head stay high precision:
#: routers are tiny and decide which experts run; embeddings and head are usually handled by a backend policy.
DEFAULT_QUANTIZED_KINDS: tuple[GroupKind, ...] = (
    GroupKind.ATTENTION,
    GroupKind.DENSE_MLP,
    GroupKind.SHARED_EXPERTS,
    GroupKind.ROUTED_EXPERTS,
)


@dataclass(frozen=True)
class ParamRule:
    """Classifies a layer-relative parameter name (e.g. `self_attn.q_proj.weight`).

    `part` is the finer sub-group inside the kind: `q`, `kv`, `o` for attention, `gate_up` or
    `down` for MLPs and experts, `gate` for routers.
    """

    pattern: str
    kind: GroupKind
    part: str

    def matches(self, relative_name: str) -> bool:
        return re.fullmatch(self.pattern, relative_name) is not None


# Rules shared by every v5 decoder family; the first matching rule wins.
_LAYER_RULES: tuple[ParamRule, ...] = (
    ParamRule(r"self_attn\.(q_proj|q_a_proj|q_b_proj)\.weight", GroupKind.ATTENTION, "q"),
    ParamRule(r"self_attn\.(k_proj|v_proj|kv_a_proj_with_mqa|kv_b_proj)\.weight", GroupKind.ATTENTION, "kv"),
    ParamRule(r"self_attn\.o_proj\.weight", GroupKind.ATTENTION, "o"),
    ParamRule(r"mlp\.experts\.gate_up_proj", GroupKind.ROUTED_EXPERTS, "gate_up"),
    ParamRule(r"mlp\.experts\.down_proj", GroupKind.ROUTED_EXPERTS, "down"),
    ParamRule(r"mlp\.shared_experts?\.(gate_proj|up_proj)\.weight", GroupKind.SHARED_EXPERTS, "gate_up"),
    ParamRule(r"mlp\.shared_experts?\.down_proj\.weight", GroupKind.SHARED_EXPERTS, "down"),
    ParamRule(r"mlp\.(gate_proj|up_proj)\.weight", GroupKind.DENSE_MLP, "gate_up"),
    ParamRule(r"mlp\.down_proj\.weight", GroupKind.DENSE_MLP, "down"),
    ParamRule(r"mlp\.(gate|shared_expert_gate)\.weight", GroupKind.ROUTER, "gate"),
)

_TOP_RULES: tuple[ParamRule, ...] = (
    ParamRule(r"model\.embed_tokens\.weight", GroupKind.EMBEDDING, "embed"),
    ParamRule(r"lm_head\.weight", GroupKind.LM_HEAD, "head"),
)


@dataclass(frozen=True)
class ArchFamily:
    """Naming table for one model family.

    `expert_keys` maps each projection (`gate`, `up`, `down`) to the per-expert checkpoint key
    template relative to the layer prefix; `{e}` is the expert index. `checkpoint_renames` are
    (in-memory, on-disk) prefix pairs applied to every other layer-relative key.
    """

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str = "model.layers."
    layer_rules: tuple[ParamRule, ...] = _LAYER_RULES
    top_rules: tuple[ParamRule, ...] = _TOP_RULES
    expert_keys: dict[str, str] = field(
        default_factory=lambda: {
            "gate": "mlp.experts.{e}.gate_proj.weight",
            "up": "mlp.experts.{e}.up_proj.weight",
            "down": "mlp.experts.{e}.down_proj.weight",
        }
    )
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def classify(self, name: str) -> tuple[int | None, ParamRule] | None:
        """Return (layer index or None, rule) for a full parameter name, or None if it is not a weight group."""
        if name.startswith(self.layer_prefix):
            index, _, relative = name[len(self.layer_prefix) :].partition(".")
            for rule in self.layer_rules:
                if rule.matches(relative):
                    return int(index), rule
            return None
        for rule in self.top_rules:
            if rule.matches(name):
                return None, rule
        return None

    def checkpoint_name(self, name: str) -> str:
        """On-disk key for a non-expert in-memory parameter name."""
        if not name.startswith(self.layer_prefix):
            return name
        index, _, relative = name[len(self.layer_prefix) :].partition(".")
        for memory, disk in self.checkpoint_renames:
            if relative.startswith(memory):
                relative = disk + relative[len(memory) :]
        return f"{self.layer_prefix}{index}.{relative}"

    def expert_key(self, layer: int, projection: str, expert: int) -> str:
        """On-disk per-expert key, e.g. `model.layers.3.mlp.experts.5.down_proj.weight`."""
        return f"{self.layer_prefix}{layer}." + self.expert_keys[projection].format(e=expert)


_MIXTRAL_EXPERTS = {
    "gate": "block_sparse_moe.experts.{e}.w1.weight",
    "up": "block_sparse_moe.experts.{e}.w3.weight",
    "down": "block_sparse_moe.experts.{e}.w2.weight",
}

FAMILIES: tuple[ArchFamily, ...] = (
    ArchFamily("qwen2_moe", ("qwen2_moe",)),
    ArchFamily("qwen3_moe", ("qwen3_moe",)),
    ArchFamily("mixtral", ("mixtral",), expert_keys=_MIXTRAL_EXPERTS,
               checkpoint_renames=(("mlp.gate.", "block_sparse_moe.gate."),)),
    ArchFamily("deepseek", ("deepseek_v2", "deepseek_v3")),
    ArchFamily("olmoe", ("olmoe",)),
    ArchFamily("glm4_moe", ("glm4_moe",)),
    ArchFamily("dense", ("llama", "mistral", "qwen2", "qwen3")),
)


def supported_model_types() -> list[str]:
    """Every `model_type` an adapter exists for, sorted."""
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str) -> ArchFamily:
    """The adapter for a config's `model_type`, or an error listing what is supported and how to add one."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported. Supported: {', '.join(supported_model_types())}. "
        "To add a family, append an ArchFamily entry to mixprec.model.arch.FAMILIES (its model_types, and "
        "per-expert checkpoint key templates if they differ from `mlp.experts.{e}.gate_proj.weight`)."
    )
