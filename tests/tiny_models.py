"""Tiny random-weight configs of every supported family, built in-process (never downloaded).

Used by the contract tests: each config is small enough that building, saving and loading it takes
well under a second, yet keeps the real module layout (fused 3-D experts, shared experts, MLA, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = ["TINY_CONFIGS", "build_tiny_model", "save_tiny_model"]

_COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, tie_word_embeddings=False, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: model_type -> extra config fields on top of `_COMMON`.
TINY_CONFIGS: dict[str, dict[str, object]] = {
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, qkv_bias=True, mlp_only_layers=[0]),
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    # MLA expands one latent to every head, so DeepSeek needs as many KV heads as query heads
    "deepseek_v3": dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "glm4_moe": dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "llama": dict(),
    "qwen3": dict(head_dim=16),
}


def build_tiny_model(model_type: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random-init tiny model of `model_type` in fp32 eval mode, with eager experts.

    `overrides` replace config fields (e.g. wider layers where a test needs in-features divisible by 128).
    """
    config = AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    return model.eval()


def save_tiny_model(model_type: str, directory: Path, seed: int = 0, **overrides: object) -> Path:
    """Build and `save_pretrained` a tiny model (per-expert on-disk keys, as real checkpoints)."""
    build_tiny_model(model_type, seed, **overrides).save_pretrained(directory)
    return directory
