"""MoE-aware calibration: the input Hessian E[x xᵀ] of every quantizable matrix, layer by layer.

Error-compensating quantizers (GPTQ) need, for each matrix, the second moment of the inputs it sees.
For attention, dense MLPs, shared experts, routers and the head that is every calibration token. A
routed expert only ever sees the tokens the router sends it, so its Hessian is built from exactly
those tokens, under the model's real top-k routing (captured from the experts module's forward
inputs, which in transformers v5 are `(hidden_states, top_k_index, top_k_weights)` in every family).
`down_proj`'s input is that expert's intermediate activation act(gate)·up on its routed tokens,
recomputed from the fused `gate_up_proj` [E, 2I, H] (FIELD.md §6.1).

An expert that receives few tokens has a rank-deficient, noisy Hessian. Below
`fallback_tokens_per_input × in_features` routed tokens its Hessian is blended with the all-token one
(for gate/up: the layer's MoE input over every token; for down: the same expert's intermediate
activation computed on every token), with weight α = tokens / threshold on its own. An expert with
zero tokens therefore gets the all-token Hessian. Token counts and α are reported per expert. (On the
bundled model the blend made no measurable difference to held-out KL: the experts that starve on
calibration text also starve on held-out text. It guards against a singular, overfitted Hessian.)

Layers are processed one at a time: the inputs of layer 0 are captured once, each layer runs on them
with hooks attached, its Hessians are handed to the caller and released, and its outputs become the
next layer's inputs. Memory is bounded by one layer's Hessians plus the calibration hidden states, and,
given a `StreamedModel`, one layer's weights: a model larger than memory is calibrated the way it is measured.

Note: layer i's inputs come from the **fp32** model, not from already-quantized earlier layers (as
sequential GPTQ would do). Variants are used one group at a time by measurement (one group quantized,
the rest fp32) and mixed across bit widths by recipes, so "earlier layers at the same bit width" is
not the context a variant's group is used in; fp32 inputs also keep the routing the reference model's
and make the Hessians independent of the bit width, so they are computed once for all variants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.core.errors import MixprecError, UnsupportedArchitectureError
from mixprec.model.arch import GroupKind
from mixprec.model.modelmap import ModelMap
from mixprec.model.streaming import StreamedModel

__all__ = ["CalibConfig", "HessianSum", "ExpertStats", "LayerHessians", "hessian_key", "blend_hessian",
           "collect_hessians", "HEAD_LAYER", "hook_input", "expert_intermediate", "decoder_of", "capture_layer_inputs",
           "layer_hessian_bytes"]

log = logging.getLogger(__name__)

#: `LayerHessians.layer` of the LM head's Hessian (it follows the last decoder layer).
HEAD_LAYER = -1
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_CHUNK_TOKENS = 4096  # tokens per matmul when recomputing expert activations on every token


@dataclass(frozen=True)
class CalibConfig:
    """How calibration activations are gathered; stored in every calibrated variant's manifest.

    `batch_windows` only trades speed for memory (it does not change the Hessians beyond float
    summation order). `fallback_tokens_per_input` sets the blend threshold described in the module
    docstring: an expert needs at least that many routed tokens per input feature to stand alone.
    """

    num_windows: int = 32
    seq_len: int = 256
    batch_windows: int = 8
    fallback_tokens_per_input: float = 1.0

    def __post_init__(self) -> None:
        if self.num_windows < 1 or self.seq_len < 2:
            raise MixprecError(f"calibration needs num_windows >= 1 and seq_len >= 2, got "
                               f"{self.num_windows} x {self.seq_len}")
        if self.batch_windows < 1:
            raise MixprecError(f"batch_windows={self.batch_windows} must be at least 1")
        if self.fallback_tokens_per_input < 0:
            raise MixprecError(f"fallback_tokens_per_input={self.fallback_tokens_per_input} must be >= 0 "
                               "(0 disables the blend with the all-token Hessian)")


class HessianSum:
    """Running Σ x xᵀ over tokens and their count: accumulate batches of any size, then take the mean."""

    def __init__(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.sum.shape[0]).to(torch.float32)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def hessian_key(param: str, expert: int | None = None) -> str:
    """Name of one matrix's Hessian: the in-memory parameter, plus `@e` for a routed expert."""
    return param if expert is None else f"{param}@{expert}"


def _unit_diag(h: torch.Tensor) -> torch.Tensor:
    """`h` scaled to unit mean diagonal, always a new tensor: two unrouted experts blended from one all-zero
    fallback must not share storage (safetensors refuses to save shared tensors)."""
    scale = float(torch.diagonal(h).mean())
    return h / scale if scale > 0 else h.clone()


def blend_hessian(own: HessianSum, fallback: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """(Hessian, α): own mean if `own.count >= threshold`, else α·own + (1−α)·fallback, α = count/threshold.

    Both sides are scaled to unit mean diagonal before blending, so α is a true mixing fraction (GPTQ
    itself is invariant to the overall scale of H).
    """
    alpha = 1.0 if own.count >= threshold else own.count / threshold
    if alpha >= 1.0:
        return own.mean(), 1.0
    if alpha == 0.0:
        return _unit_diag(fallback), 0.0
    return alpha * _unit_diag(own.mean()) + (1.0 - alpha) * _unit_diag(fallback), alpha


@dataclass
class ExpertStats:
    """Routing statistics of one MoE layer: routed tokens and own-Hessian weight α per expert."""

    tokens: list[int]
    alpha_gate_up: list[float]
    alpha_down: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "alpha_gate_up": [round(a, 4) for a in self.alpha_gate_up],
                "alpha_down": [round(a, 4) for a in self.alpha_down]}


@dataclass
class LayerHessians:
    """The Hessians of one decoder layer (or of the head, `layer == HEAD_LAYER`), keyed by `hessian_key`."""

    layer: int
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, ExpertStats] = field(default_factory=dict)
    tokens: int = 0


def hook_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def expert_intermediate(module: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """act(gate)·up of one expert on tokens `x` [n, H], from the fused `gate_up_proj` (gate rows first)."""
    gate, up = torch.nn.functional.linear(x, module.gate_up_proj[expert].float()).chunk(2, dim=-1)
    return module.act_fn(gate) * up


class _ExpertsObserver:
    """Per-expert Hessians from the tokens the router actually sent to each expert."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        if not hasattr(module, "act_fn") or getattr(module, "has_bias", False):
            raise UnsupportedArchitectureError(
                f"{name}: experts module {type(module).__name__} has no act_fn or has biases; calibration "
                "supports the gated [gate; up] experts of the families in mixprec.model.arch.FAMILIES")
        self.name, self.module = name, module
        experts, rows, hidden = module.gate_up_proj.shape
        self.gate_up = [HessianSum(hidden) for _ in range(experts)]
        self.down = [HessianSum(rows // 2) for _ in range(experts)]
        self.all_tokens = HessianSum(hidden)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = hook_input(args, kwargs).reshape(-1, self.all_tokens.sum.shape[0]).to(torch.float32)
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self.all_tokens.add(x)
        self.inputs.append(x.detach())
        for e in range(len(self.gate_up)):
            rows = (index == e).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel():
                xe = x[rows]
                self.gate_up[e].add(xe)
                self.down[e].add(expert_intermediate(self.module, e, xe))

    def _all_token_down(self, expert: int) -> torch.Tensor:
        total = HessianSum(self.down[expert].sum.shape[0])
        for x in self.inputs:
            for chunk in x.split(_CHUNK_TOKENS):
                total.add(expert_intermediate(self.module, expert, chunk))
        return total.mean()

    def finish(self, per_input: float) -> tuple[dict[str, torch.Tensor], ExpertStats]:
        hessians: dict[str, torch.Tensor] = {}
        stats = ExpertStats([h.count for h in self.gate_up], [], [])
        gate_up_param, down_param = (f"{self.name}.{p}" for p in _EXPERT_PARAMS)
        all_inputs = self.all_tokens.mean()
        for e, (gu, dn) in enumerate(zip(self.gate_up, self.down, strict=True)):
            h, alpha = blend_hessian(gu, all_inputs, per_input * gu.sum.shape[0])
            hessians[hessian_key(gate_up_param, e)] = h
            stats.alpha_gate_up.append(alpha)
            threshold = per_input * dn.sum.shape[0]
            if dn.count >= threshold:
                h, alpha = dn.mean(), 1.0
            else:
                h, alpha = blend_hessian(dn, self._all_token_down(e), threshold)
            hessians[hessian_key(down_param, e)] = h
            stats.alpha_down.append(alpha)
        self.inputs.clear()
        return hessians, stats


class _LayerObserver:
    """Forward pre-hooks on one layer's matrices; accumulate → `finish()` → hooks removed by `close()`."""

    def __init__(self, model: torch.nn.Module, params: list[str]) -> None:
        self.sums: dict[str, HessianSum] = {}
        self.experts: dict[str, _ExpertsObserver] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for param in params:
            module_name, _, attr = param.rpartition(".")
            module = model.get_submodule(module_name)
            if attr in _EXPERT_PARAMS:
                if module_name not in self.experts:
                    self.experts[module_name] = _ExpertsObserver(module_name, module)
                    self.handles.append(module.register_forward_pre_hook(self.experts[module_name],
                                                                         with_kwargs=True))
                continue
            self.sums[param] = HessianSum(getattr(module, attr).shape[-1])
            self.handles.append(module.register_forward_pre_hook(self._adder(self.sums[param]), with_kwargs=True))

    @staticmethod
    def _adder(target: HessianSum) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            target.add(hook_input(args, kwargs).detach())
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def finish(self, layer: int, per_input: float) -> LayerHessians:
        result = LayerHessians(layer, {key: s.mean() for key, s in self.sums.items()})
        for name, observer in self.experts.items():
            hessians, stats = observer.finish(per_input)
            result.hessians.update(hessians)
            result.experts[name] = stats
        result.tokens = max([s.count for s in self.sums.values()] +
                            [o.all_tokens.count for o in self.experts.values()] + [0])
        return result


class _InputsCaptured(Exception):
    """Raised by the capture hook to stop the forward pass once layer 0's inputs are recorded."""


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise UnsupportedArchitectureError(f"{type(model).__name__}: expected a decoder with `.layers` and `.norm` "
                                           "under its base model; calibration supports transformers decoder LMs")
    layer_types = getattr(model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: mixed attention layer types {sorted(set(layer_types))} are not supported by "
            "calibration (one attention mask is reused for every layer)")
    return base


def capture_layer_inputs(model: torch.nn.Module, tokens: torch.Tensor,
                         batch: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Hidden states and keyword arguments entering decoder layer 0, one entry per batch of windows."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hook_input(args, kwargs).detach(), rest))
        raise _InputsCaptured

    # prepended: on a streamed model it runs before the hook that reads layer 0, which is then never read here
    handle = decoder_of(model).layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        for chunk in tokens.split(batch):
            try:
                model(input_ids=chunk, use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
    return captured


def _layer_params(model_map: ModelMap, layer: int) -> list[str]:
    params = [ref.param for g in model_map.groups if g.layer == layer and g.kind is not GroupKind.EMBEDDING
              for ref in g.weights]
    return list(dict.fromkeys(params))


def layer_hessian_bytes(model_map: ModelMap) -> int:
    """The largest decoder layer's Hessians in bytes (fp32 [in, in] per parameter and routed expert): what
    calibration holds at once besides one layer's weights and the calibration hidden states, so callers can
    tell before starting whether an error-compensating method fits in memory (a 256-expert layer with hidden
    size 7168 needs ~52 GB of gate/up Hessians alone)."""
    per_layer: dict[int, dict[tuple[str, int | None], int]] = {}
    for group in model_map.groups:
        if group.layer is None or group.kind is GroupKind.EMBEDDING:
            continue
        matrices = per_layer.setdefault(group.layer, {})
        for ref in group.weights:
            matrices[(ref.param, ref.expert)] = 4 * ref.shape[1] ** 2
    return max((sum(m.values()) for m in per_layer.values()), default=0)


def collect_hessians(model: torch.nn.Module | StreamedModel, model_map: ModelMap, tokens: torch.Tensor,
                     config: CalibConfig, include_head: bool = True) -> Iterator[LayerHessians]:
    """Yield each decoder layer's Hessians in order (then the head's), running the fp32 model layer by layer.

    `tokens` [N, T] are the calibration windows. Every weight group of the map gets a Hessian except the
    embedding, whose "input" is a one-hot token (its Hessian along the hidden dimension is the identity).
    A `StreamedModel` holds one layer's weights at a time: the layer is read once, stays resident while every
    batch of windows runs through it and its Hessians are finished (the down-projection fallback reruns the
    experts), and is released before the Hessians are yielded.
    """
    streamed = model if isinstance(model, StreamedModel) else None
    module = streamed.model if streamed is not None else model
    decoder = decoder_of(module)
    with torch.no_grad():
        with streamed.resident(module.get_input_embeddings()) if streamed is not None else nullcontext():
            states = capture_layer_inputs(module, tokens, config.batch_windows)  # the embedding read once
        for index, layer in enumerate(decoder.layers):
            with streamed.resident(layer) if streamed is not None else nullcontext():
                observer = _LayerObserver(module, _layer_params(model_map, index))
                try:
                    outputs = [layer(hidden, **kwargs) for hidden, kwargs in states]
                finally:
                    observer.close()
                states = [(out[0] if isinstance(out, tuple) else out, kwargs)
                          for out, (_, kwargs) in zip(outputs, states, strict=True)]
                result = observer.finish(index, config.fallback_tokens_per_input)
            yield result
        if include_head:
            head = HessianSum(states[0][0].shape[-1])
            with streamed.resident(decoder.norm) if streamed is not None else nullcontext():
                for hidden, _ in states:
                    head.add(decoder.norm(hidden))
            yield LayerHessians(HEAD_LAYER, {"lm_head.weight": head.mean()}, tokens=head.count)
