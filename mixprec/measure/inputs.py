"""Inputs of a measurement: the variants it needs, their disjointness from the data, and its fingerprint.

The fingerprint (model, data, settings, variant file hashes) is what ties a table to what it was
made from: the job store refuses to continue a table whose recorded fingerprint differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixprec.core.errors import MixprecError, VariantError
from mixprec.model.data import DataSpec, TokenWindows, require_disjoint
from mixprec.model.loading import Checkpoint
from mixprec.quant.variants import Variant, ensure_variants

if TYPE_CHECKING:
    from mixprec.measure.config import MeasureConfig

__all__ = ["measure_variants", "check_disjoint", "measurement_fingerprint"]


def measure_variants(config: MeasureConfig, checkpoint: Checkpoint) -> dict[int, Variant]:
    """The variants the measurement needs, each checked against its manifest's sha256 (a bit-flipped file
    would give NaN KL); missing or damaged ones are quantized again unless --no-quantize."""
    configs = [config.quant_config(b) for b in config.variant_bits]
    kinds = config.variant_kinds
    found: dict[int, Variant] = {}
    for quant in configs:
        folder = Path(config.work) / "variants" / quant.variant_id
        try:
            variant = Variant.open(folder, checkpoint.fingerprint)
        except MixprecError:
            continue
        if variant.config == quant and set(config.kinds) <= set(variant.manifest.kinds):
            try:
                variant.verify()
                found[quant.bits] = variant
            except VariantError:
                if not config.quantize_missing:
                    raise
    missing = [q for q in configs if q.bits not in found]
    if missing and not config.quantize_missing:
        listed = " ".join(str(q.bits) for q in missing)
        raise MixprecError(f"variants {[q.variant_id for q in missing]} are missing in "
                           f"{Path(config.work) / 'variants'}; run `mixprec quantize --bits {listed} --work "
                           f"{config.work}` (with the same --group-size/--asym), or drop --no-quantize")
    for variant in ensure_variants(checkpoint, checkpoint.model_map("layer"), missing, config.work, kinds):
        found[variant.bits] = variant
    return found


def check_disjoint(variants: dict[int, Variant], windows: TokenWindows) -> None:
    """Refuse to measure on the tokens a calibrated quantizer (GPTQ) was fitted on (FIELD.md §8.4)."""
    for variant in variants.values():
        data = (variant.manifest.calibration_identity or {}).get("data")
        if data is not None:
            try:
                require_disjoint(DataSpec(**data), windows.spec)
            except MixprecError as exc:
                raise MixprecError(f"{variant.path} was quantized on the measurement data: {exc}") from exc


def measurement_fingerprint(checkpoint: Checkpoint, variants: dict[int, Variant], windows: TokenWindows,
                 config: MeasureConfig) -> dict[str, Any]:
    return {"model": checkpoint.fingerprint, "data": windows.spec.sha256, "settings": config.settings(),
            "variants": {v.manifest.variant_id: v.manifest.file_sha256 for v in variants.values()}}
