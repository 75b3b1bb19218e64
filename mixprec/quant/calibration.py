"""Calibration for the variants stage: Hessians computed once per model and data, cached per layer on disk.

`Calibration` is what `quantize_variant(..., calibration=...)` consumes. It runs
`mixprec.quant.hessians.collect_hessians` once, writing one safetensors file per layer under
`WORK/calibration/<key>/` as it goes (so memory stays bounded by one layer), and afterwards serves
each matrix's Hessian by loading one layer file at a time. Because layer inputs come from the fp32
model (see `mixprec.quant.hessians`), the Hessians do not depend on the bit width: every variant, and
every later run with the same model, data and settings, reuses the same files.

Calibration data must be disjoint from the data that measures and evaluates the variants. By
default it is text of the bundled corpus's **train** split (stdlib files that are in neither the
shipped "calibration" split, used by measurement and search, nor the "evaluation" split), tokenized
with the model's tokenizer; `text_files` replaces it with any other text.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_dir, atomic_write_json, read_json, sha256_text
from mixprec.core.progress import progress
from mixprec.model.arch import GroupKind
from mixprec.model.data import TokenWindows, WindowConfig, check_seq_len, load_windows, windows_from_tokens
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import Group, WeightRef
from mixprec.model.streaming import STREAMING_MODES, open_model
from mixprec.quant import QuantConfig, Quantizer, get_quantizer
from mixprec.quant.gptq import GPTQSettings
from mixprec.quant.hessians import HEAD_LAYER, CalibConfig, collect_hessians, hessian_key

__all__ = ["Calibration", "calibration_windows", "stdlib_train_windows", "CALIBRATION_SCHEMA_VERSION"]

log = logging.getLogger(__name__)

CALIBRATION_SCHEMA_VERSION = 1
_STATS_FILE = "calibration.json"
_HESSIAN_INPUTS = "fp32"  # layer inputs come from the unquantized model (see mixprec.quant.hessians)


def _jsonable(obj: Any) -> Any:
    """The object as it reads back from JSON (tuples become lists), so identities compare equal after a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _held_out_files(model_dir: Path) -> set[str]:
    splits_file = model_dir / "splits.json"
    if not splits_file.exists():
        return set()
    splits = read_json(splits_file).get("splits", {})
    return {f for name in ("calibration", "evaluation") for f in splits.get(name, {}).get("files", [])}


def stdlib_train_windows(model_dir: Path, windows: WindowConfig) -> TokenWindows:
    """Windows cut from stdlib files of the bundled corpus's train split, tokenized with the model's tokenizer.

    Only as many files as needed are tokenized, picked evenly over the sorted split so the windows
    cover many modules. A file that the model folder's `splits.json` lists as held out is an error.
    """
    from transformers import AutoTokenizer

    from mixprec.bundled.corpus import load_corpus

    files = load_corpus().train.files
    overlap = sorted({f.rel_path for f in files} & _held_out_files(model_dir))
    if overlap:
        raise MixprecError(f"{model_dir / 'splits.json'} lists train-split files {overlap[:3]} as held out: the "
                           "stdlib on this machine splits differently; pass --calib-data with other text")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    needed = windows.seq_len * windows.num_windows
    count = min(len(files), 2 * windows.num_windows)
    while True:
        picked = [files[round(i * (len(files) - 1) / max(count - 1, 1))] for i in range(count)]
        ids: list[int] = []
        for f in picked:
            ids.extend(tokenizer(f.text, add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        if len(ids) >= needed or count == len(files):
            break
        count = min(len(files), 2 * count)
    if sum(1 for i in ids if i != tokenizer.eos_token_id) < len(ids) // 2:
        raise MixprecError(f"{model_dir}: its tokenizer turns the calibration text into (almost) nothing but "
                           "end-of-text tokens (no tokenizer files?); add the model's tokenizer, pass --calib-data "
                           "with text it reads, or use data-free RTN options (--options rtn-g64 rtn-g32 rtn-g128)")
    source = f"stdlib:train[{count} of {len(files)} files]"
    return windows_from_tokens(torch.tensor(ids, dtype=torch.int64), windows, source, "train")


def calibration_windows(model_dir: str | Path, config: CalibConfig,
                        text_files: list[Path] | None = None) -> TokenWindows:
    """The calibration windows: `text_files` if given, else the stdlib train split (see module docstring)."""
    windows = WindowConfig(config.seq_len, config.num_windows)
    check_seq_len(model_dir, config.seq_len, "--calib-seq-len")
    if text_files:
        return load_windows(model_dir, "quantizer-calibration", windows, text_files)
    return stdlib_train_windows(Path(model_dir), windows)


class Calibration:
    """Hessians of one checkpoint on one set of calibration windows, plus the solver settings that use them.

    Lifecycle: `prepare()` (implicit on first use) computes and caches every layer; `hessian()` serves
    one matrix's Hessian, keeping one layer in memory; `record()` is what the variant manifest stores.
    """

    def __init__(self, checkpoint: Checkpoint, windows: TokenWindows, config: CalibConfig, cache_root: Path,
                 solver: GPTQSettings | None = None, streaming: str = "auto") -> None:
        if tuple(windows.tokens.shape) != (config.num_windows, config.seq_len):
            raise MixprecError(f"calibration windows are {tuple(windows.tokens.shape)} but the config asks for "
                               f"{config.num_windows} x {config.seq_len}; build them with calibration_windows()")
        if streaming not in STREAMING_MODES:
            raise MixprecError(f"streaming={streaming!r} is unknown; use one of {STREAMING_MODES}")
        self.checkpoint, self.windows, self.config, self.streaming = checkpoint, windows, config, streaming
        self.solver = solver or GPTQSettings()
        key = sha256_text(json.dumps([checkpoint.fingerprint, windows.spec.sha256,
                                      config.fallback_tokens_per_input, _HESSIAN_INPUTS]))[:16]
        self.cache_dir = Path(cache_root) / key
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None

    def identity(self) -> dict[str, Any]:
        """Everything that makes two calibrated variants differ besides the quantizer config (JSON-normal)."""
        return _jsonable({"data": self.windows.spec.to_dict(), "config": asdict(self.config),
                          "solver": asdict(self.solver), "hessian_inputs": _HESSIAN_INPUTS})

    def quantizer(self, config: QuantConfig) -> Quantizer:
        """The quantizer for `config`, with this calibration's solver settings where the method has them."""
        return get_quantizer(config, self.solver)

    def _complete(self) -> bool:
        return (self.cache_dir / _STATS_FILE).exists()

    def prepare(self) -> None:
        """Compute every layer's Hessians from the fp32 model, one layer file at a time (skipped if cached)."""
        if self._complete():
            return
        started = time.perf_counter()
        # the fp32 model, one layer resident at a time when it would not fit comfortably (STREAMING_MODES)
        model = open_model(self.checkpoint, self.streaming, torch.device("cpu"))
        model_map = self.checkpoint.model_map("layer")
        layers: dict[str, Any] = {}
        with atomic_dir(self.cache_dir) as tmp:
            stream = collect_hessians(model, model_map, self.windows.tokens, self.config)
            for result in progress(stream, desc="calibrate", unit="layer", total=model_map.num_layers + 1):
                tensors = {k: v.contiguous() for k, v in result.hessians.items()}
                save_file(tensors, tmp / self._file(result.layer))
                layers[str(result.layer)] = {"tokens": result.tokens,
                                             "experts": {n: s.to_dict() for n, s in result.experts.items()}}
                for name, stats in result.experts.items():
                    log.info("%s: routed tokens per expert %s (%d expert matrices blended with all-token Hessians)",
                             name, stats.tokens,
                             sum(a < 1.0 for a in stats.alpha_gate_up + stats.alpha_down))
            atomic_write_json(tmp / _STATS_FILE, {
                "schema_version": CALIBRATION_SCHEMA_VERSION, "identity": self.identity(), "layers": layers,
                "model_fingerprint": self.checkpoint.fingerprint,
                "elapsed_s": round(time.perf_counter() - started, 3)})
        log.info("calibration Hessians written to %s in %.1f s", self.cache_dir, time.perf_counter() - started)

    @staticmethod
    def _file(layer: int) -> str:
        return "head.safetensors" if layer == HEAD_LAYER else f"layer_{layer:04d}.safetensors"

    def _layer(self, layer: int) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != layer:
            self.prepare()
            path = self.cache_dir / self._file(layer)
            try:
                with safe_open(path, "pt") as handle:
                    self._loaded = (layer, {k: handle.get_tensor(k) for k in handle.keys()})
            except Exception as exc:
                raise MixprecError(f"{path} is missing or corrupt ({exc}); delete {self.cache_dir} and re-run") from exc
        return self._loaded[1]

    def hessian(self, group: Group, ref: WeightRef) -> torch.Tensor:
        """The Hessian [in, in] of one matrix; the embedding's is the identity (its input is one-hot)."""
        if group.kind is GroupKind.EMBEDDING:
            return torch.eye(ref.shape[1])
        layer = HEAD_LAYER if group.kind is GroupKind.LM_HEAD else group.layer
        if layer is None:
            raise MixprecError(f"group {group.name} has no layer; calibration cannot place its Hessian")
        key = hessian_key(ref.param, ref.expert)
        tensors = self._layer(layer)
        if key not in tensors:
            raise MixprecError(f"{self.cache_dir / self._file(layer)} has no Hessian for {key}; delete "
                               f"{self.cache_dir} and re-run")
        return tensors[key]

    def record(self) -> dict[str, Any]:
        """Identity plus per-layer token counts and per-expert routing statistics, for the manifest."""
        self.prepare()
        stats = read_json(self.cache_dir / _STATS_FILE)
        return {"identity": self.identity(), "layers": stats["layers"], "cache": str(self.cache_dir)}
