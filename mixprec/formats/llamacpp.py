"""llama.cpp names and the `llama-quantize --tensor-type-file` override file.

llama.cpp names tensors by role (`blk.3.ffn_down_exps.weight`) where Hugging Face checkpoints name
them by module (`model.layers.3.mlp.experts.5.down_proj.weight`), and it stores a layer's routed experts
as one 3-D tensor per projection, so one type covers every expert of that projection. `GGUF_NAMES` is
the table between the two (pure data, FIELD.md §5.2), shared by the GGUF writer and the override file.

The override file holds whitespace-separated `REGEX=TYPE` items. llama-quantize lower-cases each
pattern, `regex_search`es it anywhere in the tensor name and takes the first match, so every item
here is anchored (`^…$`), escaped, lower-case and matches exactly one tensor: order never matters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_write_text
from mixprec.model.modelmap import ModelMap

__all__ = [
    "GGUF_ARCHS",
    "GGUF_NAMES",
    "GGUFName",
    "gguf_name",
    "tensor_types",
    "override_items",
    "write_tensor_type_file",
    "read_tensor_type_file",
    "is_tensor_type_file",
    "match_tensor_type",
]

#: Hugging Face model_type -> llama.cpp architecture name (`general.architecture`).
GGUF_ARCHS: dict[str, str] = {
    "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama", "llama": "llama", "mistral": "llama",
    "qwen2": "qwen2", "qwen3": "qwen3", "olmoe": "olmoe", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2",
    "glm4_moe": "glm4moe",
}

_LAYER = r"model\.layers\.(?P<layer>\d+)\."
_EXPERT = r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."

#: (checkpoint key regex, GGUF name template). `{layer}` is filled from the match; keys with an
#: `expert` group become one slice of a 3-D `*_exps` tensor. First match wins.
GGUF_NAMES: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (_LAYER + r"input_layernorm\.weight", "blk.{layer}.attn_norm.weight"),
    (_LAYER + r"post_attention_layernorm\.weight", "blk.{layer}.ffn_norm.weight"),
    (_LAYER + r"self_attn\.q_proj\.(?P<s>weight|bias)", "blk.{layer}.attn_q.{s}"),
    (_LAYER + r"self_attn\.k_proj\.(?P<s>weight|bias)", "blk.{layer}.attn_k.{s}"),
    (_LAYER + r"self_attn\.v_proj\.(?P<s>weight|bias)", "blk.{layer}.attn_v.{s}"),
    (_LAYER + r"self_attn\.o_proj\.(?P<s>weight|bias)", "blk.{layer}.attn_output.{s}"),
    (_LAYER + r"self_attn\.q_norm\.weight", "blk.{layer}.attn_q_norm.weight"),
    (_LAYER + r"self_attn\.k_norm\.weight", "blk.{layer}.attn_k_norm.weight"),
    (_LAYER + r"self_attn\.q_a_proj\.weight", "blk.{layer}.attn_q_a.weight"),
    (_LAYER + r"self_attn\.q_a_layernorm\.weight", "blk.{layer}.attn_q_a_norm.weight"),
    (_LAYER + r"self_attn\.q_b_proj\.weight", "blk.{layer}.attn_q_b.weight"),
    (_LAYER + r"self_attn\.kv_a_proj_with_mqa\.weight", "blk.{layer}.attn_kv_a_mqa.weight"),
    (_LAYER + r"self_attn\.kv_a_layernorm\.weight", "blk.{layer}.attn_kv_a_norm.weight"),
    (_LAYER + r"self_attn\.kv_b_proj\.weight", "blk.{layer}.attn_kv_b.weight"),
    (_LAYER + _EXPERT + r"(?:gate_proj|w1)\.weight", "blk.{layer}.ffn_gate_exps.weight"),
    (_LAYER + _EXPERT + r"(?:up_proj|w3)\.weight", "blk.{layer}.ffn_up_exps.weight"),
    (_LAYER + _EXPERT + r"(?:down_proj|w2)\.weight", "blk.{layer}.ffn_down_exps.weight"),
    (_LAYER + r"mlp\.shared_experts?\.gate_proj\.weight", "blk.{layer}.ffn_gate_shexp.weight"),
    (_LAYER + r"mlp\.shared_experts?\.up_proj\.weight", "blk.{layer}.ffn_up_shexp.weight"),
    (_LAYER + r"mlp\.shared_experts?\.down_proj\.weight", "blk.{layer}.ffn_down_shexp.weight"),
    (_LAYER + r"mlp\.shared_expert_gate\.weight", "blk.{layer}.ffn_gate_inp_shexp.weight"),
    (_LAYER + r"(?:mlp|block_sparse_moe)\.gate\.weight", "blk.{layer}.ffn_gate_inp.weight"),
    (_LAYER + r"mlp\.gate\.e_score_correction_bias", "blk.{layer}.exp_probs_b.bias"),
    (_LAYER + r"mlp\.gate_proj\.weight", "blk.{layer}.ffn_gate.weight"),
    (_LAYER + r"mlp\.up_proj\.weight", "blk.{layer}.ffn_up.weight"),
    (_LAYER + r"mlp\.down_proj\.weight", "blk.{layer}.ffn_down.weight"),
)
_COMPILED = tuple((re.compile(pattern), template) for pattern, template in GGUF_NAMES)


@dataclass(frozen=True)
class GGUFName:
    """Where a checkpoint tensor goes in a GGUF: its tensor name and, for routed experts, its slice."""

    name: str
    expert: int | None = None


def gguf_name(key: str) -> GGUFName | None:
    """The GGUF tensor a checkpoint key becomes, or None when llama.cpp has no place for it."""
    for pattern, template in _COMPILED:
        match = pattern.fullmatch(key)
        if match:
            fields = match.groupdict()
            expert = fields.pop("expert", None)
            return GGUFName(template.format(**fields), None if expert is None else int(expert))
    return None


def tensor_types(model_map: ModelMap, groups: Mapping[str, int | None],
                 type_for: Callable[[int, int], str]) -> dict[str, str]:
    """GGUF tensor name -> ggml type for every quantized matrix of a recipe.

    `type_for(bits, cols)` gives the type written at a width for a row length (the quantizer's ladder and
    llama.cpp's shape fallback). Experts of one projection must agree: llama.cpp has one type per tensor.
    """
    types: dict[str, str] = {}
    owner: dict[str, str] = {}
    for group_name, bits in groups.items():
        if bits is None:
            continue
        for ref in model_map.group(group_name).weights:
            target = gguf_name(ref.key)
            if target is None:
                raise MixprecError(f"{ref.key} (group {group_name}) has no llama.cpp tensor name; "
                                   "this family cannot be written as GGUF")
            new = type_for(bits, ref.shape[1])
            if types.setdefault(target.name, new) != new:
                raise MixprecError(
                    f"groups {owner[target.name]} and {group_name} both write {target.name} but ask for "
                    f"{types[target.name]} and {new}; llama.cpp stores one type per tensor (all experts of a "
                    "projection), so give them the same bits or search at --granularity fine")
            owner.setdefault(target.name, group_name)
    return types


def override_items(types: Mapping[str, str]) -> list[str]:
    """One anchored, lower-case `REGEX=type` item per tensor, in tensor order."""
    return [f"^{re.escape(name.lower())}$={qtype.lower()}" for name, qtype in types.items()]


def write_tensor_type_file(path: str, types: Mapping[str, str]) -> None:
    """The `llama-quantize --tensor-type-file` file (one item per line) that reproduces `types`."""
    atomic_write_text(path, "\n".join(override_items(types)) + "\n")


def read_tensor_type_file(text: str) -> list[tuple[str, str]]:
    """(lower-cased pattern, TYPE) items of an override file, parsed as llama-quantize does."""
    items = []
    for token in text.split():
        pattern, sep, qtype = token.partition("=")
        if not sep or not pattern or not qtype:
            raise MixprecError(f"tensor-type item {token!r} is not REGEX=TYPE")
        items.append((pattern.lower(), qtype.upper()))
    return items


def is_tensor_type_file(path: Path) -> bool:
    """A file of anchored `^…$=type` items (what `write_tensor_type_file` writes), which an export may replace."""
    try:
        tokens = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(tokens) and all(re.fullmatch(r"\^\S+\$=[a-z0-9_]+", token) for token in tokens)


def match_tensor_type(items: Iterable[tuple[str, str]], name: str) -> str | None:
    """The type llama-quantize gives tensor `name`: the first item whose pattern is found in the name."""
    for pattern, qtype in items:
        if re.search(pattern, name):
            return qtype
    return None
