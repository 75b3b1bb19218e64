"""Shape of the bundled Qwen2-MoE model and how to build it.

The shape is chosen so the MoE group kinds mixprec handles exist in one small model: attention with
q/k/v bias, routed experts (fused 3-D parameters), a router, and a shared expert with its sigmoid
gate. Every layer is MoE and top-k weights are not renormalised, the layout of Qwen2-MoE as released
and the one llama.cpp's `qwen2moe` graph computes, so the bundled model also runs in llama.cpp
(`dense_layers` and `norm_topk_prob` give the other layouts). It stays within 5-15M parameters so it
trains in minutes on two CPU cores and ships as a bf16 file of about 20 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

__all__ = ["ModelConfig", "to_hf_config", "build_model", "count_parameters"]

# Note: on CPU the default experts implementation (grouped_mm) was slower than the per-expert loop
# and batched_mm ran out of memory in training (FIELD.md section 6.4), so it is pinned and recorded.
EXPERTS_IMPLEMENTATION = "eager"


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the bundled model; `dense_layers` use a plain MLP, every other layer is MoE."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    dense_layers: tuple[int, ...] = ()
    intermediate_size: int = 768
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 512
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01
    #: Renormalise the top-k routing weights to sum to one. llama.cpp's `qwen2moe` graph never does, so the
    #: bundled model (meant to run there too) trains with False and no dense layers.
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} outside [0, {self.num_layers})")
        if len(set(self.dense_layers)) == self.num_layers:
            raise ValueError("every layer is dense; leave at least one MoE layer")


def to_hf_config(config: ModelConfig, bos_id: int, eos_id: int, pad_id: int) -> Qwen2MoeConfig:
    """The transformers config, with the Qwen2-MoE defaults that bite set explicitly.

    `norm_topk_prob` defaults to False and `tie_word_embeddings` to False in Qwen2-MoE; both are
    spelled out so a future default change cannot silently alter the model.
    """
    hf = Qwen2MoeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        decoder_sparse_step=1,
        mlp_only_layers=list(config.dense_layers),
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        qkv_bias=True,
        tie_word_embeddings=False,
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    hf._experts_implementation = EXPERTS_IMPLEMENTATION
    return hf


def build_model(hf_config: Qwen2MoeConfig, seed: int) -> Qwen2MoeForCausalLM:
    """A freshly initialised fp32 model; the seed alone fixes its weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.float32, experts_implementation=EXPERTS_IMPLEMENTATION
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (buffers such as the rotary `inv_freq` are not counted)."""
    return sum(p.numel() for p in model.parameters())
