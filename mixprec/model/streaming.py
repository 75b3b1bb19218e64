"""A streamed model: the transformers skeleton on the meta device, each unit's weights read only while it runs.

Why: `load_model` materialises the whole model in fp32, 2x a bf16 checkpoint, so a 30B MoE needs
hundreds of GB just to be measured. exllamav3 keeps one layer resident at a time; so does this.

How:
* The skeleton is built by `accelerate.init_empty_weights(include_buffers=False)`: parameters live on
  the meta device (no memory), buffers are real, so the rotary `inv_freq` is computed exactly as a
  normal load computes it. Persistent buffers (DeepSeek's `e_score_correction_bias`) are read from
  the checkpoint once; they are tiny.
* A unit is a decoder layer (`model.layers.N`) or a top-level module owning parameters outside the
  layers (embedding, final norm, head). `resident(*modules)` reads a unit's tensors from the
  safetensors shards (memory-mapped read-only and shared, `mixprec.model.tensorfile`, each shard mapped only
  for that read), converts them to the
  model dtype, and swaps them into the skeleton's parameter objects (`torch.utils.swap_tensors`, so
  references held elsewhere, e.g. by the weight swapper, stay valid); on exit they go back to meta.
* Routed experts are stored per expert on disk and fused in memory (FIELD.md §6.2): the model map's
  `WeightRef`s say where each expert matrix goes in `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I].
* Forward hooks make a plain `model(input_ids=...)` stream too, so whole-model forwards (reference
  capture, the naive path) run unchanged; a caller that runs a layer many times (the KL engine runs
  every job of a batch through it) wraps the loop in `resident` so the layer is read once.

* Prefetch (default on CUDA): `prefetch(unit)` reads the next unit in a background thread (on a GPU into
  pinned host memory, copied on a side stream), so the KL engine's read and host->device copy of layer j+1
  overlap the compute of layer j; `resident` then waits for that copy only.

The numbers equal the in-memory model's bitwise: the same stored values are converted to the same
dtype and the same modules run (tests/test_streaming.py checks logits and measured KL).
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from mixprec.core.errors import ModelLoadError
from mixprec.model.arch import family_for
from mixprec.model.loading import EXPERTS_IMPLEMENTATION, Checkpoint
from mixprec.model.modelmap import WeightRef
from mixprec.model.tensorfile import TensorFile

__all__ = ["STREAMING_MODES", "StreamedModel", "build_skeleton", "weight_bytes", "available_memory", "open_model",
           "should_stream"]

log = logging.getLogger(__name__)

#: `on` always streams, `off` loads the whole model, `auto` streams when the model would not fit comfortably.
STREAMING_MODES = ("auto", "on", "off")
#: Under `auto`, the in-memory path (faster: no reads per layer) is kept while the whole model takes at most this
#: share of the memory budget; the rest is left for hidden states, logits and quantized weights.
_AUTO_SHARE = 0.5
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 1 << 20


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the kernel (glibc only; elsewhere nothing to do).

    # Note: a layer is hundreds of 1-2 MB tensors (one per expert matrix), below glibc's mmap threshold, so
    # they live in malloc arenas; without a trim the arenas keep the freed layers and resident memory grows by
    # about a layer per batch (measured: 1.84 vs 1.00 GB retained after one batch of the benchmark model).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _allocate_large_tensors_with_mmap() -> None:
    """Make glibc serve allocations of 1 MiB and more with their own mmap (glibc only; elsewhere nothing).

    # Note: a process-wide setting, made on purpose when a streamed model is built. glibc raises its mmap
    # threshold to the size of the largest block freed (up to 32 MiB), after which a streamed layer's tensors
    # come from the heap, and each layer lands at new addresses while the freed ones stay mapped: the address
    # space grew by ~17 MB per layer of a 15 MB-per-layer model with flat resident memory, so a run under a
    # data-size limit failed. With a fixed threshold each tensor is unmapped when freed: flat in both.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def build_skeleton(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint's causal LM with parameters on the meta device and real buffers, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    return model.eval()


class _Reader:
    """Finds the shard holding a key, mapping each shard only for the reads of one unit."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    @contextmanager
    def open(self) -> Iterator[Any]:
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}

            def read(key: str) -> TensorFile:
                file = self.checkpoint.key_to_file.get(key)
                if file is None:
                    raise ModelLoadError(f"{self.checkpoint.path}: no tensor named {key!r} in the checkpoint")
                if file not in handles:
                    handles[file] = stack.enter_context(TensorFile(file))
                return handles[file]

            yield read


class StreamedModel:
    """A meta-device skeleton whose units are made resident on demand (see the module docstring)."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", prefetch: bool | None = None) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = torch.device(device)
        #: read (and, on a GPU, copy) the next unit while the current one runs; default on for CUDA only, since on
        #: a CPU it holds a second layer for little gain (the read is a memory copy from the page cache)
        self.prefetch_enabled = self.device.type == "cuda" if prefetch is None else prefetch
        self._pending: dict[str, Future[tuple[torch.Tensor, Any]]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._copy_stream: Any = None  # a CUDA stream, made on the first prefetch
        _allocate_large_tensors_with_mmap()
        self.model = build_skeleton(checkpoint, dtype)
        self.reads = 0
        self.bytes_read = 0
        self._reader = _Reader(checkpoint)
        self._family = family_for(checkpoint.model_type)
        self._family_map = checkpoint.model_map("layer")
        self._experts = self._expert_refs()
        self._params = dict(self.model.named_parameters())
        self._names = {id(p): n for n, p in self._params.items()}
        self._units = self._find_units()
        self._count: Counter[str] = Counter()
        self._load_buffers()
        self._buffers_to(self.device)
        self._hooks = [h for module in self._units for h in self._hook(module)]

    # -- structure ----------------------------------------------------------------------------------

    def _expert_refs(self) -> dict[str, list[WeightRef]]:
        refs: dict[str, list[WeightRef]] = defaultdict(list)
        for group in self._family_map.groups:
            for ref in group.weights:
                if ref.expert is not None:
                    refs[ref.param].append(ref)
        return dict(refs)

    def _find_units(self) -> dict[torch.nn.Module, tuple[str, ...]]:
        """Module -> canonical names of the parameters it owns (a tied head owns the embedding's)."""
        prefix = self._family.layer_prefix.rstrip(".")
        units: dict[torch.nn.Module, tuple[str, ...]] = {
            layer: tuple(self._names[id(p)] for p in layer.parameters()) for layer in self.layers}
        in_layers = {name for names in units.values() for name in names}
        for name, module in self.model.named_modules():
            own = list(module.parameters(recurse=False))
            if own and not name.startswith(prefix + "."):
                units[module] = tuple(self._names[id(p)] for p in own if self._names[id(p)] not in in_layers)
        return units

    def _hook(self, module: torch.nn.Module) -> list[Any]:
        stacks: list[ExitStack] = []

        def enter(*_: Any) -> None:
            stacks.append(ExitStack())
            stacks[-1].enter_context(self.resident(module))

        def leave(*_: Any) -> None:
            stacks.pop().close()

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def _load_buffers(self) -> None:
        """Persistent buffers stored in the checkpoint (e.g. DeepSeek's expert-score bias) are read once."""
        with self._reader.open() as read, torch.no_grad():
            for name, buffer in self.model.named_buffers():
                key = self._family.checkpoint_name(name)
                if key in self.checkpoint.key_to_file:
                    read(key).copy_into(key, buffer)

    def _buffers_to(self, device: torch.device) -> None:
        """Buffers are real and small: they live on the compute device for good (parameters stay meta)."""
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)

    # -- residency ----------------------------------------------------------------------------------

    def unit_bytes(self, module: torch.nn.Module) -> int:
        """Bytes the unit's parameters take when resident, in the model dtype."""
        return sum(self._params[n].numel() for n in self._units[module]) * self.dtype.itemsize

    @property
    def layers(self) -> list[torch.nn.Module]:
        """The decoder-layer units in order."""
        return list(self.model.get_submodule(self._family.layer_prefix.rstrip(".")))

    @contextmanager
    def resident(self, *modules: torch.nn.Module) -> Iterator[None]:
        """Within the block, the parameters of `modules` (units, or modules inside one) hold real weights."""
        names = [n for module in modules for n in self._owned(module)]
        self._acquire(names)
        try:
            yield
        finally:
            self._release(names)

    def _owned(self, module: torch.nn.Module) -> tuple[str, ...]:
        if module in self._units:
            return self._units[module]
        return tuple(self._names[id(p)] for p in module.parameters())

    def _acquire(self, names: list[str]) -> None:
        fresh = [n for n in dict.fromkeys(names) if self._count[n] == 0]
        if fresh:
            with self._reader.open() as read, torch.no_grad():
                for name in fresh:
                    tensor = self._take_prefetched(name) if name in self._pending else \
                        self._read_param(name, read).to(self.device)
                    torch.utils.swap_tensors(self._params[name], torch.nn.Parameter(tensor, requires_grad=False))
        for name in names:
            self._count[name] += 1

    # -- prefetch -----------------------------------------------------------------------------------

    def prefetch(self, *modules: torch.nn.Module) -> None:
        """Start reading `modules`' weights in the background (when `prefetch_enabled`), so that a later `resident`
        finds them ready: the KL engine asks for layer j+1 while layer j runs. On CUDA each tensor is read into
        pinned host memory and copied on a side stream, so the copy overlaps the compute; `resident` makes the
        compute stream wait for it."""
        if not self.prefetch_enabled:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixprec-prefetch")
        for name in dict.fromkeys(n for module in modules for n in self._owned(module)):
            if self._count[name] == 0 and name not in self._pending:
                self._pending[name] = self._executor.submit(self._fetch, name)

    def _fetch(self, name: str) -> tuple[torch.Tensor, Any]:
        """One parameter read on the host (pinned for a GPU) and its copy to the device started; (tensor, event)."""
        with self._reader.open() as read, torch.no_grad():
            tensor = self._read_param(name, read)
        if self.device.type != "cuda":
            return tensor.to(self.device), None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            copied = tensor.pin_memory().to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return copied, event

    def _take_prefetched(self, name: str) -> torch.Tensor:
        tensor, event = self._pending.pop(name).result()
        if event is not None:  # the compute stream waits for the copy; the copy's memory now belongs to it
            torch.cuda.current_stream(self.device).wait_event(event)
            tensor.record_stream(torch.cuda.current_stream(self.device))
        return tensor

    def _release(self, names: list[str]) -> None:
        for name in names:
            self._count[name] -= 1
        released = False
        for name in dict.fromkeys(names):
            if self._count[name] == 0:
                param = self._params[name]
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                torch.utils.swap_tensors(param, torch.nn.Parameter(empty, requires_grad=False))
                released = True
        if released:
            _return_freed_memory()

    def restore(self, ref: WeightRef, view: torch.Tensor) -> None:
        """Write the checkpoint's own values of matrix `ref` into `view` (its place in a resident parameter).

        The weight swapper restores swapped matrices this way on a streamed model instead of keeping a copy
        of the originals, which for a layer's routed experts would double the layer's resident size."""
        with self._reader.open() as read, torch.no_grad():
            view.copy_(ref.slice_disk(read(ref.key).view(ref.key)))

    def _read_param(self, name: str, read: Any) -> torch.Tensor:
        """One in-memory parameter from disk: a plain key, or the fused experts assembled per expert."""
        refs = self._experts.get(name)
        if refs is None or name in self.checkpoint.key_to_file:
            key = name if refs is not None else self._family.checkpoint_name(name)
            tensor = read(key).get_tensor(key, self.dtype)
        else:  # per-expert keys straight from the map into their place in the fused tensor: no temporaries
            tensor = torch.empty(self._params[name].shape, dtype=self.dtype)
            for ref in refs:
                read(ref.key).copy_into(ref.key, ref.slice_memory(tensor))
        self.reads += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        """Remove the forward hooks and drop prefetched weights (the skeleton stays on the meta device)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for future in self._pending.values():
            future.result()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def weight_bytes(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of every parameter of the model in `dtype` (from a meta-device instance: nothing is read)."""
    return sum(int(torch.Size(shape).numel()) for shape in checkpoint.param_shapes().values()) * dtype.itemsize


def available_memory(device: torch.device) -> int:
    """Memory free for this process now: free memory of the CUDA device, or available RAM, less where the
    process's own data-size limit (RLIMIT_DATA, e.g. `ulimit -d`) leaves less, so `auto` streams under a cap."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = int(psutil.virtual_memory().available)
    limit = _data_limit_left()
    return free if limit is None else min(free, limit)


def _data_limit_left() -> int | None:
    """Bytes this process may still add under RLIMIT_DATA (None: no limit, or not Linux)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError):
        return None
    return None


def should_stream(checkpoint: Checkpoint, streaming: str, device: torch.device, max_memory: int | None = None) -> bool:
    """Whether a stage runs `checkpoint` streamed under mode `streaming` (`STREAMING_MODES`)."""
    if streaming not in STREAMING_MODES:
        raise ModelLoadError(f"streaming mode {streaming!r} is unknown; use one of {STREAMING_MODES}")
    if streaming != "auto":
        return streaming == "on"
    budget = max_memory if max_memory is not None else available_memory(device)
    need = weight_bytes(checkpoint)
    stream = need > _AUTO_SHARE * budget
    log.info("model weights %.2f GB in fp32 vs memory budget %.2f GB: %s", need / 1e9, budget / 1e9,
             "streaming one layer at a time" if stream else "loading the whole model")
    return stream


def open_model(checkpoint: Checkpoint, streaming: str, device: torch.device,
               max_memory: int | None = None) -> torch.nn.Module | StreamedModel:
    """The fp32 model for a stage that runs it: streamed, or loaded whole where that fits (`STREAMING_MODES`)."""
    from mixprec.model.loading import load_model

    if should_stream(checkpoint, streaming, device, max_memory):
        return StreamedModel(checkpoint, device=device)
    return load_model(checkpoint, device=device)
