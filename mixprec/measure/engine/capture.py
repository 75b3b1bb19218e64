"""Reference capture for the KL engine: what enters each decoder layer, and the reference logits.

Separated from `mixprec.measure.engine.core` because it is the part that touches transformers internals: it finds
the embedding, decoder layers, final norm and head of any v5 causal LM, and records each layer's
input with a forward pre-hook registered `with_kwargs=True` (FIELD.md §6.4), so a later rerun from
layer i calls the layer exactly as the model did (same position embeddings, same mask), which is
what makes the cached path bitwise equal to a full forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mixprec.core.errors import MixprecError

__all__ = ["Blocks", "LayerInputs", "find_blocks", "capture_reference", "expand_kwargs", "head_logits", "strict_fp32"]


@dataclass(frozen=True)
class Blocks:
    """The four parts of a decoder LM the engine calls directly."""

    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Module


def find_blocks(model: torch.nn.Module) -> Blocks:
    """Embedding, decoder layers, final norm and head of a transformers causal LM."""
    try:
        decoder = model.get_decoder()  # type: ignore[operator]
        blocks = Blocks(model.get_input_embeddings(), decoder.layers, decoder.norm,  # type: ignore[operator]
                        model.get_output_embeddings())  # type: ignore[operator]
    except AttributeError as exc:
        raise MixprecError(f"{type(model).__name__}: cannot find embedding / decoder layers / final norm / head "
                           f"({exc}); the KL engine supports transformers decoder-only causal LMs") from exc
    if blocks.head is None:
        raise MixprecError(f"{type(model).__name__} has no output embedding (lm_head); not a causal LM")
    return blocks


@dataclass
class LayerInputs:
    """Per chunk of windows: the input of every layer position 0..L (L = final norm), the layer kwargs,
    and the reference logits (shifted to the scored positions) when they fit the memory budget."""

    inputs: list[list[torch.Tensor]]
    kwargs: list[list[dict[str, Any]]]
    stored_logits: list[torch.Tensor] | None

    def logits(self, chunk: int, blocks: Blocks, rows: slice = slice(None)) -> torch.Tensor:
        """Reference logits [rows, V] of one chunk's scored positions (recomputed if not stored)."""
        if self.stored_logits is not None:
            return self.stored_logits[chunk][rows]
        return head_logits(blocks, self.inputs[-1][chunk], rows)


def head_logits(blocks: Blocks, hidden: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Logits [rows, V] of the scored positions of `hidden` [b, T, H]: all of them as the model computes them
    (one matmul over [b, T]), or the slice `rows` of the flattened scored positions only."""
    if rows == slice(None):
        return _scored(blocks.head(blocks.norm(hidden)))
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return blocks.head(blocks.norm(flat[rows]))


def _scored(logits: torch.Tensor) -> torch.Tensor:
    """[b, T, V] -> [b*(T-1), V]: the last position of a window has no next token to score."""
    return logits[:, :-1].reshape(-1, logits.shape[-1])


@contextmanager
def _recording(blocks: Blocks, inputs: list[list[torch.Tensor]],
               kwargs: list[list[dict[str, Any]]]) -> Iterator[None]:
    def layer_hook(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            kw = dict(kw)
            hidden = args[0] if args else kw.pop("hidden_states")
            inputs[index].append(hidden.detach().clone())
            kwargs[index].append(kw)
        return hook

    def norm_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        inputs[-1].append(args[0].detach().clone())

    handles = [layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True)
               for i, layer in enumerate(blocks.layers)]
    handles.append(blocks.norm.register_forward_pre_hook(norm_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_reference(model: torch.nn.Module, blocks: Blocks, chunks: list[torch.Tensor],
                      logits_budget_bytes: int) -> LayerInputs:
    """Run the model once over `chunks` (token tensors [b, T]) and record everything a rerun needs.

    The head recomputed from the recorded final state is checked to equal the model's own logits
    bitwise; a model that post-processes logits (soft-capping, scaling) would fail here rather than
    be measured against the wrong reference.
    """
    num_layers = len(blocks.layers)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(num_layers)]
    vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator, union-attr]
    rows = sum(int(t.shape[0]) * (int(t.shape[1]) - 1) for t in chunks)
    store = rows * vocab * 4 <= logits_budget_bytes
    stored: list[torch.Tensor] = []
    first: torch.Tensor | None = None
    with _recording(blocks, inputs, kwargs):
        for tokens in chunks:
            logits = model(input_ids=tokens, use_cache=False).logits.float()
            first = logits if first is None else first
            if store:
                stored.append(_scored(logits))
    if any(len(per_layer) != len(chunks) for per_layer in inputs):
        raise MixprecError(f"{type(model).__name__}: not every decoder layer ran once per forward; the KL engine "
                           "needs a plain stack of decoder layers")
    if not torch.equal(blocks.head(blocks.norm(inputs[-1][0])).float(), first):
        raise MixprecError(f"{type(model).__name__}: the head applied to the final hidden state does not reproduce "
                           "the model's logits (soft-capping or scaling?); the KL engine cannot rerun this "
                           "architecture from cached layer inputs")
    return LayerInputs(inputs, kwargs, stored if store else None)


def _expand(value: Any, batch: int, times: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and batch > 1 and value.shape[0] == batch:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_expand(v, batch, times) for v in value)
    return value


def expand_kwargs(kwargs: dict[str, Any], batch: int, times: int) -> dict[str, Any]:
    """Layer kwargs recorded for `batch` windows, made valid for `times` × `batch` windows.

    Per-window tensors (an eager attention mask [b, 1, T, T]) are tiled; broadcast ones (position
    embeddings [1, T, D], the None mask under sdpa) are left alone. Tiling is exact because every
    window is a full, unpadded sequence, so all windows share one mask.
    """
    if times == 1:
        return kwargs
    return {key: _expand(value, batch, times) for key, value in kwargs.items()}


@contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """Disable TF32 matmuls on CUDA inside the block (restoring the caller's setting after).

    TF32 has a 10-bit mantissa: its noise would sit above the 5-8 bit effects being measured.
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
