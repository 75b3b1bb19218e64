"""Load a `mixprec compile` output as a working transformers model, dequantizing on load.

The model is built from its config.json with initialisation skipped, and every parameter is filled
from the shards: quantized matrices are unpacked and dequantized exactly as the search did
(`QuantizedWeight.dequantize`), then written through the model map into their slice of the
transformers v5 parameter (a per-expert matrix goes into its rows of the fused `gate_up_proj` /
`down_proj`); every other tensor is placed by its on-disk name, translated with the family table
(`ArchFamily.checkpoint_name`, so Mixtral's `block_sparse_moe` names need no string hacks). A
parameter left unfilled is an error, never silently random.

Before reading tensors, the index must match the shards' headers, each header must cover its file
exactly, and, when `mixprec_compile.json` is present, each shard's sha256 must match the one
recorded at compile time, so a truncated or corrupted shard is a `ModelLoadError` naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixprec.checkpoint.pack import PackError, unpack_codes
from mixprec.checkpoint.qformat import (
    REPORT_FILE,
    group_size_of,
    original_key,
    quantization_config_of,
    quantized_base,
)
from mixprec.checkpoint.shards import ShardHeader, checkpoint_shards
from mixprec.core.errors import ModelLoadError
from mixprec.core.fileio import read_json, sha256_file
from mixprec.model.arch import family_for
from mixprec.model.loading import EXPERTS_IMPLEMENTATION
from mixprec.model.modelmap import WeightRef, build_model_map
from mixprec.quant import QuantizedWeight

__all__ = ["CompiledCheckpoint", "is_mixprec_checkpoint", "load", "dequantize_whole"]

log = logging.getLogger(__name__)


def is_mixprec_checkpoint(path: str | Path) -> bool:
    """True when the folder's config.json declares `quantization_config.quant_method: mixprec`."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    qconfig = read_json(config_path).get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "mixprec"


def _verify_hashes(path: Path, headers: list[ShardHeader]) -> None:
    report_path = path / REPORT_FILE
    if not report_path.exists():
        log.warning("%s has no %s; shard contents cannot be checked against their hashes", path, REPORT_FILE)
        return
    recorded = read_json(report_path).get("shards", {})
    for header in headers:
        expected = recorded.get(header.path.name, {}).get("sha256")
        if expected is None:
            raise ModelLoadError(f"{header.path} is not listed in {report_path}; the folder mixes files of "
                                 "different compiles, re-run `mixprec compile`")
        if sha256_file(header.path) != expected:
            raise ModelLoadError(f"{header.path} is corrupt: its sha256 differs from the one recorded in "
                                 f"{report_path} at compile time; re-run `mixprec compile` or re-copy the folder")


@dataclass(frozen=True)
class CompiledCheckpoint:
    """A validated compiled folder: config, its mixprec quantization_config, and shard headers."""

    path: Path
    config: dict[str, Any]
    qconfig: dict[str, Any]
    headers: tuple[ShardHeader, ...]

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> CompiledCheckpoint:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path / 'config.json'} is missing: {path} is not a compiled checkpoint folder")
        config = read_json(path / "config.json")
        qconfig = quantization_config_of(config, str(path / "config.json"))
        headers = checkpoint_shards(path)
        if verify_hashes:
            _verify_hashes(path, headers)
        checkpoint = cls(path, config, qconfig, tuple(headers))
        missing = [b for b in checkpoint.bits if f"{b}.qweight" not in checkpoint.key_to_file
                   or f"{b}.scales" not in checkpoint.key_to_file]
        if missing:
            raise ModelLoadError(f"{path}: config.json lists quantized matrices whose tensors are not in the "
                                 f"shards, e.g. {missing[:3]}; the folder is incomplete, re-run `mixprec compile`")
        return checkpoint

    @property
    def bits(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.qconfig["bits"].items()}

    @cached_property
    def key_to_file(self) -> dict[str, Path]:
        return {name: h.path for h in self.headers for name in h.tensors}

    def plain_keys(self) -> list[str]:
        """Stored tensors that are not parts of a quantized matrix."""
        parts = {f"{base}.{suffix}" for base in self.bits for suffix in ("qweight", "scales", "qzeros")}
        return [k for k in self.key_to_file if k not in parts]


def _build_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # Note: the weights are dequantized here, so the model itself is a plain float model; keeping the
    # mixprec quantization_config would make `save_pretrained` mislabel it as packed.
    del config.quantization_config
    # Note: transformers' own context (scoped; restores torch.nn.init on exit) skips random init,
    # which would otherwise dominate load time; every parameter is overwritten and checked below.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    return model


class _Filler:
    """Writes stored tensors into a model's state and tracks which parameters got filled."""

    def __init__(self, model: torch.nn.Module, checkpoint: CompiledCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.state: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        stored = set(checkpoint.plain_keys()) | {original_key(b) for b in checkpoint.bits}
        model_type = str(checkpoint.config["model_type"])
        model_map = build_model_map(shapes, model_type, int(checkpoint.config.get("num_hidden_layers", 0)), stored)
        self.refs = [ref for group in model_map.groups for ref in group.weights]
        self.ref_by_key = {r.key: r for r in self.refs if not r.fused_on_disk}
        self.ref_by_base = {quantized_base(r): r for r in self.refs}
        family = family_for(model_type)
        self.name_of = {family.checkpoint_name(n): n for n in self.state}
        self.filled: set[int] = set()
        self.filled_refs: set[WeightRef] = set()
        self._handles: dict[Path, Any] = {}

    def read(self, key: str) -> torch.Tensor:
        file = self.checkpoint.key_to_file[key]
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(file, "pt")
            return self._handles[file].get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{file}: tensor {key!r} cannot be read ({exc}); the file is corrupt") from exc

    def _copy(self, target: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(target.shape) != tuple(value.shape):
            raise ModelLoadError(f"{self.checkpoint.path}: {what} has shape {tuple(value.shape)} but the model "
                                 f"built from config.json expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)

    def fill_plain(self, key: str) -> bool:
        ref = self.ref_by_key.get(key)
        if ref is not None:
            self._copy(ref.slice_memory(self.state[ref.param]), self.read(key), key)
            self.filled_refs.add(ref)
            return True
        name = self.name_of.get(key)
        if name is None:
            return False
        self._copy(self.state[name], self.read(key), key)
        self.filled.add(id(self.state[name]))
        self.filled_refs.update(r for r in self.refs if r.param == name)
        return True

    def fill_quantized(self, base: str, bits: int) -> None:
        ref = self.ref_by_base.get(base)
        if ref is None:
            raise ModelLoadError(f"{self.checkpoint.path}: quantized matrix {base!r} belongs to no weight of the "
                                 f"{self.checkpoint.config['model_type']} model built from config.json")
        q = self.checkpoint.qconfig
        try:
            codes = unpack_codes(self.read(f"{base}.qweight"), bits, ref.shape)
            groups = self.read(f"{base}.scales").shape[1]
            zeros = None if q["symmetric"] else unpack_codes(self.read(f"{base}.qzeros"), bits, (ref.shape[0], groups))
        except PackError as exc:
            raise ModelLoadError(f"{self.checkpoint.key_to_file[f'{base}.qweight']}: {base}: {exc}") from exc
        weight = QuantizedWeight(codes, self.read(f"{base}.scales"), zeros, bits, group_size_of(q, base))
        view = ref.slice_memory(self.state[ref.param])
        self._copy(view, weight.dequantize(view.dtype), base)
        self.filled_refs.add(ref)

    def check_complete(self) -> None:
        seen: dict[int, str] = {}
        for name, tensor in self.state.items():
            seen.setdefault(id(tensor), name)  # tied weights share one tensor
        refs_by_param: dict[str, list[WeightRef]] = {}
        for ref in self.refs:
            refs_by_param.setdefault(ref.param, []).append(ref)
        missing = [name for key, name in seen.items() if key not in self.filled
                   and not (name in refs_by_param and all(r in self.filled_refs for r in refs_by_param[name]))]
        if missing:
            raise ModelLoadError(f"{self.checkpoint.path}: {len(missing)} model tensor(s) are not in the checkpoint, "
                                 f"e.g. {missing[:3]}; the folder is incomplete or for another config")


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         verify_hashes: bool = True) -> torch.nn.Module:
    """A transformers causal LM in eval mode with the compiled weights dequantized to `dtype`.

    Example::

        model = mixprec.load("out/stdlib-moe-3bpw")
        logits = model(input_ids).logits
    """
    return dequantize_whole(CompiledCheckpoint.open(path, verify_hashes), dtype, device)


def dequantize_whole(checkpoint: CompiledCheckpoint, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> torch.nn.Module:
    """The opened compiled checkpoint as a whole model in `dtype`, every matrix dequantized (see `load`)."""
    path = checkpoint.path
    model = _build_model(checkpoint.path, dtype)
    filler = _Filler(model, checkpoint)
    ignored = [key for key in checkpoint.plain_keys() if not filler.fill_plain(key)]
    for base, bits in checkpoint.bits.items():
        filler.fill_quantized(base, bits)
    filler.check_complete()
    if ignored:
        log.info("%s: %d stored tensor(s) are not used by the model class (e.g. %s)", path, len(ignored), ignored[:3])
    return model.to(device).eval()

