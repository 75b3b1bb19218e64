"""Open local Hugging Face checkpoints: validate, read tensors by key, fingerprint, and load models.

Nothing here touches the network: models are local folders (config.json + safetensors). Bad folders
fail early with `ModelLoadError` naming the file and the fix, before any weights are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixprec.core.errors import ModelLoadError
from mixprec.core.fileio import sha256_file
from mixprec.core.records import drop_none
from mixprec.model.arch import family_for
from mixprec.model.modelmap import Granularity, ModelMap, build_model_map

__all__ = ["Checkpoint", "ModelRecord", "resolve_model_path", "load_model", "EXPERTS_IMPLEMENTATION"]

log = logging.getLogger(__name__)

#: Pinned MoE kernel choice. On CPU `eager` was as fast as `grouped_mm` and `batched_mm` ran out of
#: memory (FIELD.md §6.4); pinning it also keeps measurements reproducible across machines.
EXPERTS_IMPLEMENTATION = "eager"


def resolve_model_path(model: str | Path | None) -> Path:
    """The given model folder, or the bundled stdlib MoE when `model` is None."""
    if model is None:
        from mixprec.bundled import bundled_model_path

        return bundled_model_path()
    return Path(model)


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist; pass a local Hugging Face model folder "
                             "(config.json + *.safetensors), or omit MODEL to use the bundled model")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; pass the model folder that contains config.json")
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{config_path} is missing: {path} is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{config_path} is not valid UTF-8 JSON ({exc}); re-download or re-save the model") \
            from exc
    except IsADirectoryError as exc:
        raise ModelLoadError(f"{config_path} is a folder, not the model's config file") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object (the model config), got a "
                             f"{type(config).__name__}")
    model_type = config.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{config_path} has no 'model_type'; cannot tell which architecture this is")
    if not isinstance(model_type, str):
        raise ModelLoadError(f"{config_path}: 'model_type' must be a string, got {model_type!r}")
    if model_type not in _causal_lm_types():
        raise ModelLoadError(f"{config_path}: model_type {model_type!r} is not a causal language model "
                             "(no AutoModelForCausalLM class); mixprec quantizes decoder LMs only")
    family_for(model_type)  # raises UnsupportedArchitectureError listing the supported families
    return config


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [path / name for name in _index_shards(index)]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelLoadError(f"{index} lists shard(s) that are missing: {absent}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if list(path.glob("*.bin")):
        raise ModelLoadError(f"{path} holds only PyTorch .bin weights; re-save it with safetensors "
                             "(model.save_pretrained(dir, safe_serialization=True))")
    raise ModelLoadError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _index_shards(index: Path) -> list[str]:
    """Shard file names of a safetensors index: plain names inside the model folder (an entry such as
    `../other/model.safetensors` would read weights from outside it)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a valid safetensors index ({exc!r})") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index}: 'weight_map' must map tensor names to shard file names")
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
    if outside:
        raise ModelLoadError(f"{index} names shard(s) outside the model folder: {outside[:3]}; shards must be "
                             "plain file names next to the index")
    return names


def _scan_keys(files: list[Path]) -> dict[str, Path]:
    key_to_file: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    key_to_file[key] = file
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}); re-download or "
                                 "re-save the checkpoint") from exc
    return key_to_file


@dataclass
class Checkpoint:
    """A validated local checkpoint: config, tensor index and content fingerprint."""

    path: Path
    config: dict[str, Any]
    files: list[Path]
    key_to_file: dict[str, Path] = field(repr=False)

    @classmethod
    def open(cls, model: str | Path | None) -> Checkpoint:
        """Validate the folder (see module docstring) and index its tensors without reading them."""
        path = resolve_model_path(model).resolve()
        config = _read_config(path)
        files = _safetensors_files(path)
        return cls(path, config, files, _scan_keys(files))

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def num_layers(self) -> int:
        value = self.config.get("num_hidden_layers", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelLoadError(f"{self.path / 'config.json'}: num_hidden_layers must be a non-negative integer, "
                                 f"got {value!r}")
        return value

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under `key`, in its stored dtype."""
        try:
            file = self.key_to_file[key]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no tensor named {key!r} in the checkpoint") from None
        try:
            with safe_open(file, "pt") as handle:
                return handle.get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"{file}: tensor {key!r} cannot be read ({exc}); the file is corrupt") from exc

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file, so any change to the model changes it."""
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for file in self.files:
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
        return digest.hexdigest()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """In-memory parameter shapes from a meta-device instance: no weights are allocated."""
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # transformers' config validation raises many types; the input is the user's
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ModelLoadError(f"{self.path / 'config.json'}: transformers cannot build the model from it "
                                 f"({type(exc).__name__}: {first}); fix or re-download config.json") from exc
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    def model_map(self, granularity: Granularity | str = Granularity.LAYER) -> ModelMap:
        """The group map of this checkpoint, with every on-disk key verified to exist."""
        return build_model_map(self.param_shapes(), self.model_type, self.num_layers,
                               self.key_to_file.keys(), granularity)


@dataclass(frozen=True)
class ModelRecord:
    """Which checkpoint an artifact was made from, as variant manifests and measurement summaries store it.

    `architecture` (the config's first `architectures` entry) is recorded by measurements only.
    """

    path: str
    fingerprint: str
    model_type: str
    architecture: str | None = None

    @classmethod
    def of(cls, checkpoint: Checkpoint, with_architecture: bool = False) -> ModelRecord:
        architecture = (checkpoint.config.get("architectures") or [checkpoint.model_type])[0]
        return cls(str(checkpoint.path), checkpoint.fingerprint, checkpoint.model_type,
                   str(architecture) if with_architecture else None)

    def to_dict(self) -> dict[str, Any]:
        return drop_none(asdict(self), ("architecture",))


def load_model(model: str | Path | Checkpoint | None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a validated checkpoint as a transformers causal LM in eval mode (offline only).

    fp32 is the default because it is the measurement reference: a bf16 model has a KL noise
    floor (~1e-5..8e-5) that hides every effect at 5 bits and above.
    """
    from transformers import AutoModelForCausalLM

    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            checkpoint.path, dtype=dtype, local_files_only=True,
            experts_implementation=EXPERTS_IMPLEMENTATION,
        )
    except OSError as exc:
        raise ModelLoadError(f"{checkpoint.path}: transformers could not load the model ({exc})") from exc
    return loaded.to(device).eval()
