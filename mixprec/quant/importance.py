"""Routed-expert importance: what each expert's inputs weigh, per input feature, under the model's routing.

Why it exists: measuring every routed expert on its own costs (experts per layer) times a fine table, e.g.
15,000 groups per width for a 256-expert, 58-layer model. `mixprec.measure.split` instead measures the
fine table (all experts of a layer and projection at once) and splits each of its losses among the experts
by their share of the output error. A quantization error ΔW of expert e moves the layer's output by
g·ΔW·x on each token routed to e (g the router's weight), and, with input features taken as uncorrelated,

    Σ_t ‖g_t ΔW x_t‖²  ≈  Σ_i (Σ_t g_t² x_ti²) · ‖ΔW[:, i]‖²

so one vector per expert and projection input suffices: Σ g² x² of the layer's MoE input (for gate and
up) and of the expert's intermediate activation act(gate)·up (for down), over the tokens the router sent
to it. That is the diagonal of a router-weighted Hessian (llama.cpp's imatrix keeps the unweighted
diagonal), a few floats per expert, so it is collected for models whose full per-expert Hessians would
not fit anywhere. On the bundled model the diagonal ranked experts as well as the full Hessian did.

The model runs layer by layer on the fp32 reference, like `mixprec.quant.hessians`, one layer resident
at a time for a `StreamedModel`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_path
from mixprec.model.arch import GroupKind
from mixprec.model.modelmap import ModelMap
from mixprec.model.streaming import StreamedModel
from mixprec.quant.hessians import capture_layer_inputs, decoder_of, expert_intermediate, hook_input

__all__ = ["ExpertImportance", "collect_expert_importance", "save_importance", "load_importance"]


@dataclass
class ExpertImportance:
    """Σ g² x² per expert and input feature of one experts module (`param` prefix `module.`)."""

    layer: int
    module: str
    gate_up: torch.Tensor  # [E, H]: inputs of gate and up
    down: torch.Tensor  # [E, I]: inputs of down
    tokens: list[int]

    def weights_for(self, param: str, expert: int) -> torch.Tensor:
        """The per-input-feature weights of one expert matrix (`param` is the fused in-memory parameter)."""
        if param == f"{self.module}.gate_up_proj":
            return self.gate_up[expert]
        if param == f"{self.module}.down_proj":
            return self.down[expert]
        raise MixprecError(f"{param} is not a matrix of experts module {self.module}")


class _Observer:
    """Forward pre-hook on one experts module: accumulate Σ g² x² per expert from its routed tokens."""

    def __init__(self, layer: int, name: str, module: torch.nn.Module) -> None:
        experts, rows, hidden = module.gate_up_proj.shape
        self.module = module
        self.result = ExpertImportance(layer, name, torch.zeros(experts, hidden, dtype=torch.float64),
                                       torch.zeros(experts, rows // 2, dtype=torch.float64), [0] * experts)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = hook_input(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1).to(torch.float32)
        for e in range(len(self.result.tokens)):
            chosen = index == e
            rows = chosen.any(dim=-1).nonzero().squeeze(-1)
            if not rows.numel():
                continue
            g2 = (weights * chosen).sum(dim=-1)[rows].square().unsqueeze(-1)
            xe = x[rows]
            self.result.gate_up[e] += (g2 * xe.square()).sum(dim=0).double()
            self.result.down[e] += (g2 * expert_intermediate(self.module, e, xe).square()).sum(dim=0).double()
            self.result.tokens[e] += int(rows.numel())


def _experts_modules(model: torch.nn.Module, model_map: ModelMap, layer: int) -> dict[str, torch.nn.Module]:
    names = {ref.param.rpartition(".")[0] for g in model_map.groups
             if g.layer == layer and g.kind is GroupKind.ROUTED_EXPERTS for ref in g.weights}
    return {name: model.get_submodule(name) for name in sorted(names)}


def collect_expert_importance(model: torch.nn.Module | StreamedModel, model_map: ModelMap, tokens: torch.Tensor,
                              batch_windows: int = 8) -> Iterator[ExpertImportance]:
    """Yield the importance of every experts module, layer by layer, from the fp32 model on `tokens` [N, T]."""
    streamed = model if isinstance(model, StreamedModel) else None
    module = streamed.model if streamed is not None else model
    decoder = decoder_of(module)
    with torch.no_grad():
        with streamed.resident(module.get_input_embeddings()) if streamed is not None else nullcontext():
            states = capture_layer_inputs(module, tokens, batch_windows)
        for index, layer in enumerate(decoder.layers):
            with streamed.resident(layer) if streamed is not None else nullcontext():
                observers = [_Observer(index, name, m) for name, m in _experts_modules(module, model_map,
                                                                                        index).items()]
                handles = [o.module.register_forward_pre_hook(o, with_kwargs=True) for o in observers]
                try:
                    outputs = [layer(hidden, **kwargs) for hidden, kwargs in states]
                finally:
                    for handle in handles:
                        handle.remove()
            states = [(out[0] if isinstance(out, tuple) else out, kwargs)
                      for out, (_, kwargs) in zip(outputs, states, strict=True)]
            yield from (o.result for o in observers)


def save_importance(found: Sequence[ExpertImportance], path: Path) -> None:
    """Write the importance of every experts module to one safetensors file (atomically): it depends only on
    the fp32 model and the windows, so the split tables of every option family can share one forward pass."""
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for imp in found:
        tensors[f"{imp.module}.gate_up"], tensors[f"{imp.module}.down"] = imp.gate_up, imp.down
        tensors[f"{imp.module}.tokens"] = torch.tensor(imp.tokens, dtype=torch.int64)
        layers[imp.module] = imp.layer
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"layers": json.dumps(layers)})


def load_importance(path: Path) -> list[ExpertImportance]:
    """Read what `save_importance` wrote; a damaged file is an error naming it and the fix."""
    try:
        with safe_open(str(path), "pt") as handle:
            layers = json.loads(handle.metadata()["layers"])
            return [ExpertImportance(int(layer), module, handle.get_tensor(f"{module}.gate_up"),
                                     handle.get_tensor(f"{module}.down"),
                                     [int(t) for t in handle.get_tensor(f"{module}.tokens")])
                    for module, layer in layers.items()]
    except Exception as exc:
        raise MixprecError(f"{path} cannot be read ({exc}); delete it and re-run (it is rebuilt)") from exc
