"""Quantized variants on disk: the whole model's quantizable weights at one uniform setting.

Layout of a work folder (one subfolder per setting, named by `QuantConfig.variant_id`):

    WORK/variants/rtn-b4-g64-sym/quantized.safetensors   codes (uint8) + fp16 scales (+ zeros) per matrix
    WORK/variants/rtn-b4-g64-sym/manifest.json          model fingerprint, settings, exact bits per group

Each variant folder is written atomically and its manifest is the completion marker, so an
interrupted `mixprec quantize` loses at most the variant in progress, and a re-run with the same
model and settings reuses every finished variant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mixprec.core.errors import FingerprintMismatchError, MixprecError, VariantError
from mixprec.core.fileio import atomic_dir, atomic_write_json, read_json, sha256_file
from mixprec.core.progress import progress
from mixprec.core.records import check_schema, drop_none, record_fields
from mixprec.core.version import __version__
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS, GroupKind
from mixprec.model.loading import Checkpoint, ModelRecord
from mixprec.model.modelmap import Group, ModelMap, WeightRef
from mixprec.model.tensorfile import TensorFile, TensorWriter
from mixprec.quant import QuantConfig, QuantizedWeight, get_quantizer

if TYPE_CHECKING:
    from mixprec.quant.calibration import Calibration

__all__ = ["VARIANT_SCHEMA_VERSION", "UnitRecord", "GroupRecord", "Totals", "VariantManifest", "Variant",
           "quantize_variant", "ensure_variants", "apply_group", "read_source"]

log = logging.getLogger(__name__)

VARIANT_SCHEMA_VERSION = 1
_WEIGHTS_FILE = "quantized.safetensors"
_MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class UnitRecord:
    """One quantized matrix: its element count, shape and exact stored bits."""

    numel: int
    shape: tuple[int, ...]
    storage_bits: int


@dataclass(frozen=True)
class GroupRecord:
    """One weight group of the model map at layer granularity, with its exact stored bits."""

    kind: str
    layer: int | None
    params: int
    storage_bits: int
    bpw: float


@dataclass(frozen=True)
class Totals:
    """Every quantized matrix of the variant together."""

    params: int
    storage_bits: int
    bpw: float


_REBUILD = "re-run `mixprec quantize` to rebuild it"


@dataclass(frozen=True)
class VariantManifest:
    """What manifest.json says about a variant: settings, source model, exact bits per matrix and group.

    `to_dict` writes exactly the keys and values variants have always had, so existing work folders
    load unchanged; `mixprec_version`, `elapsed_s` and `calibration` are left out when None.
    """

    variant_id: str
    quant_config: QuantConfig
    model: ModelRecord
    kinds: tuple[str, ...]
    file_sha256: str
    units: dict[str, UnitRecord]
    groups: dict[str, GroupRecord]
    totals: Totals
    mixprec_version: str | None = None
    elapsed_s: float | None = None
    calibration: dict[str, Any] | None = None
    schema_version: int = VARIANT_SCHEMA_VERSION

    @property
    def calibration_identity(self) -> dict[str, Any] | None:
        """The calibration data and solver settings of a calibrated variant (None for the others)."""
        return None if self.calibration is None else self.calibration.get("identity")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> VariantManifest:
        check_schema(data, VARIANT_SCHEMA_VERSION, where, VariantError, _REBUILD)
        record_fields(data, cls, where, VariantError, _REBUILD)
        try:
            return cls(
                variant_id=str(data["variant_id"]), quant_config=QuantConfig(**data["quant_config"]),
                model=ModelRecord(**data["model"]), kinds=tuple(data["kinds"]), file_sha256=str(data["file_sha256"]),
                units={str(k): UnitRecord(**{**u, "shape": tuple(u["shape"])}) for k, u in data["units"].items()},
                groups={str(k): GroupRecord(**g) for k, g in data["groups"].items()},
                totals=Totals(**data["totals"]), mixprec_version=data.get("mixprec_version"),
                elapsed_s=data.get("elapsed_s"), calibration=data.get("calibration"),
            )
        except (MixprecError, TypeError, KeyError, AttributeError) as exc:
            raise VariantError(f"{where}: malformed manifest ({exc}); {_REBUILD}") from exc

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version, "variant_id": self.variant_id,
            "quant_config": asdict(self.quant_config), "model": self.model.to_dict(), "kinds": list(self.kinds),
            "file_sha256": self.file_sha256,
            "units": {k: {**asdict(u), "shape": list(u.shape)} for k, u in self.units.items()},
            "groups": {k: asdict(g) for k, g in self.groups.items()}, "totals": asdict(self.totals),
            "mixprec_version": self.mixprec_version, "elapsed_s": self.elapsed_s, "calibration": self.calibration,
        }
        return drop_none(data, ("mixprec_version", "elapsed_s", "calibration"))


@dataclass
class Variant:
    """A finished variant folder, validated against its manifest and (optionally) a model fingerprint."""

    path: Path
    manifest: VariantManifest = field(repr=False)

    @classmethod
    def open(cls, path: str | Path, fingerprint: str | None = None) -> Variant:
        path = Path(path)
        manifest_path = path / _MANIFEST_FILE
        if not manifest_path.exists():
            raise VariantError(f"{path} is not a finished variant (no {_MANIFEST_FILE}); run `mixprec quantize`")
        manifest = VariantManifest.from_dict(read_json(manifest_path), str(manifest_path))
        if fingerprint is not None and manifest.model.fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"{path} was quantized from another model (fingerprint {manifest.model.fingerprint[:12]}…, "
                f"expected {fingerprint[:12]}…); re-run `mixprec quantize` for this model or use its own work folder"
            )
        if not (path / _WEIGHTS_FILE).exists():
            raise VariantError(f"{path / _WEIGHTS_FILE} is missing; delete {path} and re-run `mixprec quantize`")
        return cls(path, manifest)

    @property
    def config(self) -> QuantConfig:
        return self.manifest.quant_config

    @property
    def bits(self) -> int:
        return self.manifest.quant_config.bits

    @cached_property
    def _handle(self) -> Any:
        try:
            return TensorFile(self.path / _WEIGHTS_FILE)  # shared read-only map: see mixprec.model.tensorfile
        except Exception as exc:
            raise VariantError(f"{self.path / _WEIGHTS_FILE} is corrupt ({exc}); delete {self.path} and "
                               "re-run `mixprec quantize`") from exc

    def close(self) -> None:
        """Unmap the weights file; the next read maps it again. A streamed run calls this after each layer so
        the file's pages read so far stop counting towards the process's resident memory."""
        handle = self.__dict__.pop("_handle", None)
        if handle is not None:
            handle.close()

    def verify(self) -> None:
        """Check the weights file against the sha256 recorded in the manifest."""
        actual = sha256_file(self.path / _WEIGHTS_FILE)
        if actual != self.manifest.file_sha256:
            raise VariantError(f"{self.path / _WEIGHTS_FILE} does not match its manifest (sha256 differs); "
                               f"delete {self.path} and re-run `mixprec quantize`")

    def quantized(self, ref: WeightRef | str) -> QuantizedWeight:
        """Codes and scales of one matrix."""
        unit = ref if isinstance(ref, str) else ref.unit
        if unit not in self.manifest.units:
            raise VariantError(f"{self.path}: matrix {unit!r} was not quantized in this variant "
                               f"(kinds: {list(self.manifest.kinds)})")
        try:
            codes = self._handle.get_tensor(f"{unit}.codes")
            scales = self._handle.get_tensor(f"{unit}.scales")
            zeros = None if self.config.symmetric else self._handle.get_tensor(f"{unit}.zeros")
        except Exception as exc:
            raise VariantError(f"{self.path / _WEIGHTS_FILE}: cannot read {unit!r} ({exc})") from exc
        shape = self.manifest.units[unit].shape
        return get_quantizer(self.config).restore(codes, scales, zeros, (int(shape[0]), int(shape[1])))

    def dequantized(self, ref: WeightRef | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized(ref).dequantize(dtype)

    def storage_bits(self, group: Group) -> int:
        """Exact bits of `group` in this variant (from the manifest, no tensors read)."""
        units = self.manifest.units
        return sum(units[ref.unit].storage_bits for ref in group.weights)


def _quantize_group(checkpoint: Checkpoint, group: Group, config: QuantConfig, writer: TensorWriter,
                    units: dict[str, UnitRecord], calibration: Calibration | None = None) -> None:
    """Quantize one group's matrices, each written out as soon as it is done: memory holds one source tensor
    (read through a shared read-only map, `mixprec.model.tensorfile`) and one matrix's codes, not the variant."""
    quantizer = get_quantizer(config) if calibration is None else calibration.quantizer(config)
    cache: dict[str, torch.Tensor] = {}
    for ref in group.weights:
        if ref.key not in cache:
            cache = {}  # the previous source tensor is freed before the next is read
            cache = {ref.key: read_source(checkpoint, ref.key)}
        matrix = ref.slice_disk(cache[ref.key])
        if tuple(matrix.shape) != ref.shape:
            raise VariantError(f"{checkpoint.path}: {ref.key} has shape {tuple(matrix.shape)} on disk but the "
                               f"model expects {ref.shape}; the checkpoint and config.json disagree")
        q = quantizer.quantize(matrix, None if calibration is None else calibration.hessian(group, ref))
        writer.add(f"{ref.unit}.codes", q.codes)
        writer.add(f"{ref.unit}.scales", q.scales)
        if q.zeros is not None:
            writer.add(f"{ref.unit}.zeros", q.zeros)
        units[ref.unit] = UnitRecord(ref.numel, tuple(ref.shape), q.storage_bits())


def read_source(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """One checkpoint tensor in fp32, read through a shared map that is closed again right away."""
    file = checkpoint.key_to_file.get(key)
    if file is None:
        raise VariantError(f"{checkpoint.path}: no tensor named {key!r} in the checkpoint; the checkpoint and "
                           "config.json disagree")
    with TensorFile(file) as handle:
        return handle.get_tensor(key, torch.float32)


def _group_summary(groups: Iterable[Group], units: Mapping[str, UnitRecord]) -> dict[str, GroupRecord]:
    summary = {}
    for group in groups:
        bits = sum(units[ref.unit].storage_bits for ref in group.weights)
        summary[group.name] = GroupRecord(group.kind.value, group.layer, group.num_params, bits,
                                          bits / group.num_params)
    return summary


def quantize_variant(checkpoint: Checkpoint, model_map: ModelMap, config: QuantConfig, out_dir: Path,
                     kinds: tuple[GroupKind, ...] = DEFAULT_QUANTIZED_KINDS,
                     calibration: Calibration | None = None) -> Variant:
    """Quantize every matrix of `kinds` at `config` and write the variant folder atomically.

    With `calibration` (`mixprec.quant.calibration.Calibration`), each matrix is quantized with its Hessian
    and the manifest gains a `calibration` record (data spec, settings, per-expert token counts).
    """
    started = time.perf_counter()
    groups = model_map.select(kinds)
    units: dict[str, UnitRecord] = {}
    with atomic_dir(out_dir) as tmp:
        metadata = {"format": "pt", "mixprec.variant": config.variant_id}
        with TensorWriter(tmp / _WEIGHTS_FILE, metadata) as writer:
            for group in progress(groups, desc=f"quantize {config.variant_id}", unit="group"):
                _quantize_group(checkpoint, group, config, writer, units, calibration)
        total_bits = sum(u.storage_bits for u in units.values())
        total_params = sum(u.numel for u in units.values())
        manifest = VariantManifest(
            variant_id=config.variant_id, quant_config=config, model=ModelRecord.of(checkpoint),
            kinds=tuple(k.value for k in kinds), file_sha256=sha256_file(tmp / _WEIGHTS_FILE), units=units,
            groups=_group_summary(groups, units), totals=Totals(total_params, total_bits, total_bits / total_params),
            mixprec_version=__version__, elapsed_s=round(time.perf_counter() - started, 3),
            calibration=None if calibration is None else calibration.record())
        atomic_write_json(tmp / _MANIFEST_FILE, manifest.to_dict())
    return Variant.open(out_dir, checkpoint.fingerprint)


def _reusable(out_dir: Path, checkpoint: Checkpoint, config: QuantConfig,
              kinds: tuple[GroupKind, ...], calibration: Calibration | None = None) -> Variant | None:
    if not (out_dir / _MANIFEST_FILE).exists():
        return None
    try:
        variant = Variant.open(out_dir, checkpoint.fingerprint)
        variant.verify()
    except (VariantError, FingerprintMismatchError) as exc:
        log.warning("rebuilding %s: %s", out_dir, exc)
        return None
    same = (variant.manifest.quant_config == config
            and variant.manifest.kinds == tuple(k.value for k in kinds)
            and variant.manifest.calibration_identity == (None if calibration is None else calibration.identity()))
    return variant if same else None


def ensure_variants(checkpoint: Checkpoint, model_map: ModelMap, configs: Iterable[QuantConfig],
                    work_dir: Path, kinds: tuple[GroupKind, ...] = DEFAULT_QUANTIZED_KINDS,
                    calibration: Calibration | None = None) -> list[Variant]:
    """Quantize each config into `work_dir/variants/`, reusing finished variants with identical inputs.

    A variant built with other calibration data or solver settings counts as different inputs and is rebuilt.
    """
    variants = []
    for config in configs:
        out_dir = Path(work_dir) / "variants" / config.variant_id
        variant = _reusable(out_dir, checkpoint, config, kinds, calibration)
        if variant is None:
            variant = quantize_variant(checkpoint, model_map, config, out_dir, kinds, calibration)
            log.info("wrote %s (%.4f bpw)", out_dir, variant.manifest.totals.bpw)
        else:
            log.info("reusing %s", out_dir)
        variants.append(variant)
    return variants


def apply_group(params: Mapping[str, torch.Tensor], group: Group, variant: Variant) -> None:
    """Overwrite `group`'s matrices in a model's parameters with the variant's dequantized weights."""
    with torch.no_grad():
        for ref in group.weights:
            view = ref.slice_memory(params[ref.param])
            view.copy_(variant.dequantized(ref, view.dtype))
