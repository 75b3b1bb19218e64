"""The KL engine: an fp32 reference on fixed windows, and fast evaluation of weight assignments against it.

An assignment maps group names to a bit width (a variant); everything else keeps the original
weights. Evaluating one means swapping those matrices in, running the model with the real top-k
routing (the model's own MoE blocks, nothing forced on), comparing its next-token distribution
with the reference (`mixprec.core.kl.compare_logits`) and restoring the weights.

Why it is fast (FIELD.md §9.6):
* Prefix cache. The reference run records what enters every decoder layer (hidden states and the
  keyword arguments: position embeddings, masks). A change whose first layer is i reruns only
  layers i..L-1, the final norm and the head. In a trial this was bitwise equal to a full forward.
* Assignment prefix cache. After each layer of an evaluation the hidden state is kept, keyed by the
  assignment of every layer before it, in a byte-bounded LRU. A later assignment that agrees on the
  first k layers (common in a search, and always the case for raise-one measurement from a base)
  starts at layer k.
* Batching. `evaluate_many` pushes the hidden states of several assignments that use the same
  weights in a layer through it in one call (concatenated along the batch), as exllamav3 does.
* Chunks. The windows run in chunks of `batch_windows`, each independently of the others, and
  `evaluate(assignment, chunks=range(a, b))` runs only some of them (a search screens a candidate on
  a few windows before it spends all of them). Cached states are kept per chunk, so the screened
  chunks of a candidate that is later evaluated in full are not run twice, and a chunk's KL is
  bitwise the same whichever other chunks ran with it.

Layer positions: -1 is the embedding, 0..L-1 the decoder layers, L the head (final norm + lm_head).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch

from mixprec.core.bytecache import ByteLRU
from mixprec.core.errors import MixprecError
from mixprec.core.kl import TokenComparison, compare_logits
from mixprec.measure.engine.capture import (
    LayerInputs,
    capture_reference,
    expand_kwargs,
    find_blocks,
    head_logits,
    strict_fp32,
)
from mixprec.measure.engine.weights import Setting, WeightSwapper
from mixprec.model.arch import GroupKind
from mixprec.model.data import TokenWindows
from mixprec.model.modelmap import ModelMap
from mixprec.model.streaming import StreamedModel
from mixprec.quant.variants import Variant

__all__ = ["STATE_DTYPES", "EngineConfig", "KLEngine", "resolve_device"]

log = logging.getLogger(__name__)

_MIB = 2**20
#: Dequantized matrices kept for reuse on a streamed model. A measurement batch uses each (matrix, width) once,
#: so a large cache only holds memory there (on the benchmark model it was half of the streamed peak).
_STREAMED_WEIGHT_CACHE_MIB = 64.0
#: `state_dtype` values; under `auto`, bf16 states once fewer than this many jobs' fp32 states fit in flight.
STATE_DTYPES = ("float32", "bfloat16", "auto")
_JOBS_IN_FLIGHT = 6


def _on_cpu(result: TokenComparison) -> TokenComparison:
    """Per-token results go back to the CPU: they are small, and the statistics (bootstrap) run there."""
    return TokenComparison(*(getattr(result, f).cpu() for f in TokenComparison.__annotations__))


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when a GPU is visible, else CPU; anything else is passed to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MixprecError(f"device {str(device)!r} was requested but no CUDA device is visible; use --device cpu")
    return resolved


@dataclass(frozen=True)
class EngineConfig:
    """Memory and batching knobs of the engine; none of them changes a result beyond float rounding, except
    `state_dtype`.

    `state_dtype` is the dtype of the hidden states kept between layers (the reference's layer inputs, the prefix
    cache, the jobs in flight); compute stays fp32. `bfloat16` halves them and rounds each layer's input: on the
    bundled model (benchmarks/bf16_states.py) that added a KL of 1.1e-5 ± 0.4e-5 to the unquantized model, 8.5x
    below the bf16-compute noise floor the measurement records, and moved no job's KL by more than that floor,
    but it moved a job's KL by 9% (median) and swapped 21 of 83 adjacent ranks, so it is not the default. `auto`
    (what `within` sets, i.e. under a memory budget) uses bfloat16 on a streamed model when fewer than
    `_JOBS_IN_FLIGHT` jobs' fp32 states fit the in-flight share (`prefix_cache_mib`), else float32.
    """

    batch_windows: int = 8
    max_batch_windows: int = 32
    prefix_cache_mib: float = 256.0
    weight_cache_mib: float = 512.0
    ref_logits_mib: float = 1024.0
    chunk_rows: int = 512
    logits_mib: float = 256.0
    state_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.state_dtype not in STATE_DTYPES:
            raise MixprecError(f"state_dtype={self.state_dtype!r} is unknown; use one of {STATE_DTYPES}")
        if self.batch_windows < 1 or self.max_batch_windows < self.batch_windows:
            raise MixprecError(f"batch_windows={self.batch_windows} must be >= 1 and <= max_batch_windows="
                               f"{self.max_batch_windows}")
        for name in ("prefix_cache_mib", "weight_cache_mib", "ref_logits_mib", "logits_mib"):
            if getattr(self, name) < 0:
                raise MixprecError(f"{name}={getattr(self, name)} must be >= 0 (0 switches that cache off)")
        if self.chunk_rows < 1:
            raise MixprecError(f"chunk_rows={self.chunk_rows} must be >= 1")

    def within(self, budget_bytes: int) -> EngineConfig:
        """These settings with every cache and buffer capped by a share of a memory budget (`--max-memory`).

        The shares leave most of the budget to what cannot shrink: the resident weights (a layer when
        streamed, the model when not) and the hidden states of the jobs in flight.
        """
        mib = budget_bytes / _MIB
        return replace(self, prefix_cache_mib=min(self.prefix_cache_mib, 0.10 * mib),
                       weight_cache_mib=min(self.weight_cache_mib, 0.05 * mib),
                       ref_logits_mib=min(self.ref_logits_mib, 0.10 * mib),
                       logits_mib=max(1.0, min(self.logits_mib, 0.05 * mib)),
                       state_dtype="auto" if self.state_dtype == "float32" else self.state_dtype)


@dataclass
class _Plan:
    """One assignment ready to run: its settings per layer position, the chunks of windows it runs, where it
    starts and from what state (one tensor per chunk run)."""

    settings: dict[int, Setting]
    chunks: tuple[int, ...]
    start: int
    state: list[torch.Tensor] | None

    def prefix(self, position: int) -> Setting:
        """Everything assigned before `position`; with the tokens it determines the input of `position`."""
        return tuple(item for p in sorted(self.settings) if p < position for item in self.settings[p])


class KLEngine:
    """fp32 reference on fixed windows + evaluation of weight assignments with prefix caching.

    Cost counters: `layer_forwards` (one assignment through one decoder layer, on whichever chunks it ran),
    `layer_calls` (calls of a decoder layer module, batching counted once) and `token_layers` (scored tokens
    x decoder layers run, the cost a search reports; exact for partial evaluations too).
    """

    def __init__(self, model: torch.nn.Module | StreamedModel, model_map: ModelMap, windows: TokenWindows,
                 variants: Mapping[int, Variant], device: str | torch.device = "cpu",
                 config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.device = resolve_device(device)
        self.streamed = model if isinstance(model, StreamedModel) else None
        if self.streamed is not None and self.streamed.device != self.device:
            raise MixprecError(f"the streamed model reads weights to {self.streamed.device} but the engine runs on "
                               f"{self.device}; build StreamedModel(..., device={str(self.device)!r})")
        self.model = self.streamed.model if self.streamed is not None else model.to(self.device).eval()  # type: ignore[union-attr]
        self.model_map = model_map
        self.windows = windows
        self.variants = dict(variants)
        self.layer_forwards = 0
        self.layer_calls = 0
        self.token_layers = 0
        self.evaluations = 0
        self.dtype = next(self.model.parameters()).dtype
        if self.dtype != torch.float32:
            log.warning("model parameters are %s, not float32: the noise floor rises to the bf16 level", self.dtype)
        self._blocks = find_blocks(self.model)
        self._chunks = [t.to(self.device) for t in windows.tokens.split(self.config.batch_windows)]
        weight_cache = self.config.weight_cache_mib if self.streamed is None else min(
            self.config.weight_cache_mib, _STREAMED_WEIGHT_CACHE_MIB)
        self._swapper = WeightSwapper(self.model, model_map, self.variants, int(weight_cache * _MIB),
                                      None if self.streamed is None else self.streamed.restore)
        self._prefix = ByteLRU(int(self.config.prefix_cache_mib * _MIB))
        started = time.perf_counter()
        with torch.no_grad(), strict_fp32(self.device):
            self._ref: LayerInputs = capture_reference(self.model, self._blocks, self._chunks,
                                                       int(self.config.ref_logits_mib * _MIB))
        self.reference_seconds = time.perf_counter() - started
        self.state_dtype = self._state_dtype()
        if self.state_dtype != torch.float32:  # the layer inputs; the head's (position L) keeps the exact reference
            self._ref.inputs[:-1] = [[t.to(self.state_dtype) for t in layer] for layer in self._ref.inputs[:-1]]

    def _state_dtype(self) -> torch.dtype:
        """The dtype hidden states are kept in (`EngineConfig.state_dtype`, `auto` resolved here)."""
        if self.config.state_dtype != "auto":
            return getattr(torch, self.config.state_dtype)
        per_job = sum(t.numel() for t in self._ref.inputs[0]) * 4
        tight = per_job * _JOBS_IN_FLIGHT > self.config.prefix_cache_mib * _MIB
        return torch.bfloat16 if self.streamed is not None and tight else torch.float32

    @property
    def num_sequences(self) -> int:
        return int(self.windows.tokens.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self._blocks.layers)

    @property
    def num_tokens(self) -> int:
        """Scored positions: every position but the last of each window (it has no next token)."""
        return self.num_sequences * (int(self.windows.tokens.shape[1]) - 1)

    @property
    def chunk_sequences(self) -> tuple[int, ...]:
        """Windows in each chunk, in order (`batch_windows` each, the last one possibly fewer)."""
        return tuple(int(tokens.shape[0]) for tokens in self._chunks)

    def evaluate(self, assignment: Mapping[str, int | None], chunks: range | None = None) -> TokenComparison:
        """Set every group named in `assignment` to that bit width's variant (None or absent = original
        weights), run from the first changed layer using cached inputs, compare with the reference
        (mixprec.core.kl.compare_logits, labels = next tokens), and restore the model's weights afterwards.

        `chunks` (a range over `chunk_sequences`; default all) runs only those chunks of windows: the result
        is bitwise the rows of those windows in a full evaluation."""
        return self._run([self._plan(assignment, chunks=self._chunk_range(chunks))], store=True)[0]

    def evaluate_many(self, assignments: Sequence[Mapping[str, int | None]]) -> list[TokenComparison]:
        """`evaluate` for several assignments at once, batching those that share weights in a layer.

        Results equal separate `evaluate` calls up to float rounding (a batched matmul may sum in
        another order). Intermediate states are not kept in the prefix cache: single-group
        candidates are rarely a prefix of anything evaluated later.
        """
        plans = [self._plan(a) for a in assignments]
        results: list[TokenComparison] = []
        for group in self._memory_groups(plans):
            results.extend(self._run(group, store=False))
        return results

    def evaluate_full(self, assignment: Mapping[str, int | None],
                      autocast_dtype: torch.dtype | None = None) -> TokenComparison:
        """Naive path: swap the weights in and run the whole model forward, with no cached state.

        It is the baseline of the benchmark, the check that the cached path is exact, and (with
        `autocast_dtype=torch.bfloat16`) the way the bf16-compute noise floor is measured.
        """
        plan = self._plan(assignment, use_cache=False, chunks=tuple(range(len(self._chunks))))
        items = tuple(item for setting in plan.settings.values() for item in setting)
        parts = []
        with torch.no_grad(), strict_fp32(self.device), self._resident(*self._owners(items)), \
                self._swapper.swapped(items):
            for c, tokens in enumerate(self._chunks):
                # Note: autocast's cast cache would keep a low-precision copy of every layer a streamed model
                # released until the forward ends, i.e. the whole model; the casts are the same without it
                with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None,
                                    cache_enabled=False):
                    logits = self.model(input_ids=tokens, use_cache=False).logits
                parts.append(self._compare(c, logits.float()))
        self.layer_forwards += self.num_layers
        self.layer_calls += self.num_layers * len(self._chunks)
        self.token_layers += self.num_layers * self.num_tokens
        self.evaluations += 1
        return _on_cpu(TokenComparison.cat(parts))

    def clear_prefix_cache(self) -> None:
        """Forget hidden states kept from earlier evaluations (the reference is kept)."""
        self._prefix.clear()

    def cache_stats(self) -> dict[str, float]:
        """Hit counts and sizes of the two caches, for logs and benchmarks."""
        return {"prefix_hits": self._prefix.hits, "prefix_entries": len(self._prefix),
                "prefix_mib": self._prefix.bytes / _MIB, "weight_hits": self._swapper.cache.hits,
                "weight_misses": self._swapper.cache.misses, "weight_mib": self._swapper.cache.bytes / _MIB}

    def _resident(self, *modules: torch.nn.Module) -> AbstractContextManager[None]:
        """Streamed model: the modules' weights are read in for the block; in memory: nothing to do."""
        return nullcontext() if self.streamed is None else self.streamed.resident(*modules)

    def _prefetch(self, position: int) -> None:
        """Streamed model: start reading the unit at layer position `position` (L: final norm and head)."""
        if self.streamed is not None:
            blocks = self._blocks
            units = [blocks.layers[position]] if position < self.num_layers else [blocks.norm, blocks.head]
            self.streamed.prefetch(*units)

    def _close_variants(self) -> None:
        """Streamed: unmap the variant files after each layer, so their pages stop counting as resident."""
        if self.streamed is not None:
            for variant in self.variants.values():
                variant.close()

    def _owners(self, setting: Setting) -> list[torch.nn.Module]:
        """The modules whose parameters a setting swaps (they must be resident while swapped)."""
        params = {ref.param for name, _ in setting for ref in self.model_map.group(name).weights}
        return [self.model.get_submodule(param.rpartition(".")[0]) for param in sorted(params)]

    # -- planning -----------------------------------------------------------------------------------

    def _position(self, name: str) -> int:
        group = self.model_map.group(name)
        if group.kind is GroupKind.EMBEDDING:
            return -1
        if group.kind is GroupKind.LM_HEAD or group.layer is None:
            return self.num_layers
        return group.layer

    def _settings(self, assignment: Mapping[str, int | None]) -> dict[int, Setting]:
        per_position: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for name, bits in assignment.items():
            if bits is None:
                continue
            if bits not in self.variants:
                raise MixprecError(f"assignment sets {name!r} to {bits} bits but the engine has variants for "
                                   f"{sorted(self.variants)} only; quantize that width first (`mixprec quantize`)")
            position = self._position(name)
            missing = [r.unit for r in self.model_map.group(name).weights
                       if r.unit not in self.variants[bits].manifest.units]
            if missing:
                raise MixprecError(f"group {name!r} is not in the {bits}-bit variant {self.variants[bits].path} "
                                   f"(it quantized kinds {list(self.variants[bits].manifest.kinds)}); re-run "
                                   "`mixprec quantize --kinds ...` including that kind, or leave the group out")
            per_position[position].append((name, bits))
        return {p: tuple(sorted(items)) for p, items in per_position.items()}

    def _chunk_range(self, chunks: range | None) -> tuple[int, ...]:
        """The chunk indices of `chunks` (all by default); an empty, stepped or out-of-range one is refused."""
        count = len(self._chunks)
        if chunks is None:
            return tuple(range(count))
        if not isinstance(chunks, range) or chunks.step != 1 or not 0 <= chunks.start < chunks.stop <= count:
            raise MixprecError(f"chunks={chunks!r} must be a non-empty range(a, b) within range(0, {count})")
        return tuple(chunks)

    def _plan(self, assignment: Mapping[str, int | None], use_cache: bool = True,
              chunks: tuple[int, ...] | None = None) -> _Plan:
        """Where `assignment` starts on `chunks` (default all): the deepest position whose input is cached for
        every one of those chunks under the assignment's own prefix, else its first changed layer."""
        settings = self._settings(assignment)
        chunks = tuple(range(len(self._chunks))) if chunks is None else chunks
        first = min(settings, default=self.num_layers)
        plan = _Plan(settings, chunks, first, None if first < 0 else [self._ref.inputs[first][c] for c in chunks])
        if use_cache:
            for position in range(self.num_layers, first, -1):
                keys = [(position, plan.prefix(position), c) for c in chunks]
                if all(key in self._prefix for key in keys):
                    plan.start, plan.state = position, [self._prefix.get(key) for key in keys]  # type: ignore[misc]
                    break
        return plan

    def _memory_groups(self, plans: list[_Plan]) -> Iterator[list[_Plan]]:
        """Split plans so that the hidden states in flight stay within the prefix-cache budget."""
        per_plan = sum(t.numel() for t in self._ref.inputs[0]) * self.state_dtype.itemsize
        size = max(1, int(self.config.prefix_cache_mib * _MIB) // max(per_plan, 1))
        for start in range(0, len(plans), size):
            yield plans[start : start + size]

    # -- running ------------------------------------------------------------------------------------

    def _run(self, plans: list[_Plan], store: bool) -> list[TokenComparison]:
        """Run plans that share their chunks (`_plan`'s default: all of them) from their start to the head."""
        with torch.no_grad(), strict_fp32(self.device):
            self._embed(plans)
            states = [p.state for p in plans]
            for layer in range(min(p.start for p in plans), self.num_layers):
                with self._resident(self._blocks.layers[layer]):  # streamed: read once for every job here
                    self._prefetch(layer + 1)  # the next layer's read (and host->device copy) overlaps this one
                    self._run_layer(plans, states, layer, store)
                self._close_variants()
            with self._resident(self._blocks.norm, self._blocks.head):
                results = [self._head(plan, state) for plan, state in zip(plans, states, strict=True)]  # type: ignore[arg-type]
        self.evaluations += len(plans)
        return results

    def _run_layer(self, plans: list[_Plan], states: list[list[torch.Tensor] | None], layer: int,
                   store: bool) -> None:
        """Push every plan's state through `layer`, grouped by the weights each plan sets there."""
        for setting, members in self._by_setting(plans, layer).items():
            with self._swapper.swapped(setting):
                outputs = self._layer(layer, [states[i] for i in members], plans[members[0]].chunks)  # type: ignore[misc]
            for i, out in zip(members, outputs, strict=True):
                states[i] = out
                prefix = plans[i].prefix(layer + 1)
                if store and prefix:  # per chunk: a partial run never stands for the chunks it did not run
                    for c, tensor in zip(plans[i].chunks, out, strict=True):
                        self._prefix.put((layer + 1, prefix, c), tensor)

    @staticmethod
    def _by_setting(plans: list[_Plan], layer: int) -> dict[Setting, list[int]]:
        groups: dict[Setting, list[int]] = defaultdict(list)
        for i, plan in enumerate(plans):
            if plan.start <= layer:
                groups[plan.settings.get(layer, ())].append(i)
        return groups

    def _embed(self, plans: list[_Plan]) -> None:
        """Plans that change the embedding get their layer-0 input computed with the swapped embedding."""
        for plan in plans:
            if plan.start >= 0:
                continue
            with self._resident(self._blocks.embed), self._swapper.swapped(plan.settings[-1]):
                plan.state = [self._blocks.embed(self._chunks[c]) for c in plan.chunks]
            plan.start = 0

    def _layer(self, layer: int, states: list[list[torch.Tensor]], chunks: tuple[int, ...]) -> list[list[torch.Tensor]]:
        """Run decoder layer `layer` on each assignment's states (one per chunk of `chunks`), several
        assignments per call; counts one layer forward per assignment and its scored tokens."""
        module = self._blocks.layers[layer]
        outputs: list[list[torch.Tensor]] = [[] for _ in states]
        per_call = max(1, self.config.max_batch_windows // self.config.batch_windows)
        for i, c in enumerate(chunks):
            for first in range(0, len(states), per_call):
                members = range(first, min(first + per_call, len(states)))
                hidden = torch.cat([states[m][i] for m in members]) if len(members) > 1 else states[first][i]
                hidden = hidden.to(self.state_dtype).float()  # as kept (a no-op for fp32 states), computed in fp32
                kwargs = expand_kwargs(self._ref.kwargs[layer][c], int(states[first][i].shape[0]), len(members))
                out = module(hidden, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                for m, part in zip(members, out.split(states[first][i].shape[0]), strict=True):
                    outputs[m].append(part.to(self.state_dtype))
                self.layer_calls += 1
        self.layer_forwards += len(states)
        self.token_layers += len(states) * sum(self._scored_tokens(c) for c in chunks)
        return outputs

    def _scored_tokens(self, chunk: int) -> int:
        windows, length = self._chunks[chunk].shape
        return int(windows) * (int(length) - 1)

    def _head(self, plan: _Plan, state: list[torch.Tensor]) -> TokenComparison:
        """Logits and KL of one plan, chunk by chunk and, where a chunk's logits exceed `logits_mib`, in
        slices of scored tokens (a 150k vocabulary x 8k tokens is 5 GB in fp32)."""
        parts = []
        for hidden, c in zip(state, plan.chunks, strict=True):
            labels = self._chunks[c][:, 1:].reshape(-1)
            for rows in self._row_slices(hidden):
                ref_logits = self._ref.logits(c, self._blocks, rows)  # before the head is swapped
                with self._swapper.swapped(plan.settings.get(self.num_layers, ())):
                    logits = head_logits(self._blocks, hidden.to(self.state_dtype).float(), rows)
                parts.append(compare_logits(ref_logits, logits, labels[rows], self.config.chunk_rows))
        return _on_cpu(TokenComparison.cat(parts))

    def _row_slices(self, hidden: torch.Tensor) -> list[slice]:
        """All scored rows at once when their logits fit `logits_mib` (bitwise the path of a full forward),
        else slices that do (the head's matmul then sums in the same order per row; equal to fp32 rounding)."""
        rows = int(hidden.shape[0]) * (int(hidden.shape[1]) - 1)
        vocab = self._blocks.head.weight.shape[0]
        per_slice = max(1, int(self.config.logits_mib * _MIB) // (vocab * 4))
        if rows <= per_slice:
            return [slice(None)]
        return [slice(start, min(start + per_slice, rows)) for start in range(0, rows, per_slice)]

    def _compare(self, c: int, logits: torch.Tensor, ref_logits: torch.Tensor | None = None) -> TokenComparison:
        if ref_logits is None:
            ref_logits = self._ref.logits(c, self._blocks)
        vocab = logits.shape[-1]
        labels = self._chunks[c][:, 1:].reshape(-1)
        q = logits[:, :-1].reshape(-1, vocab)
        return compare_logits(ref_logits, q, labels, self.config.chunk_rows)
