"""Typed artifacts between stages: manifests, summaries, rows and recipes read back exactly as written.

Each stage hands the next a small file; its dataclass (`VariantManifest`, `MeasurementSummary`,
`MeasurementRow`, `Recipe`) must turn the file into typed fields and back into the same bytes, so
work folders and shipped recipes written before the types existed keep loading, and a file of
another schema version or with stray keys fails with one line naming the file and the fix.

Run: .venv/bin/python -m pytest -q tests/test_artifacts.py
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from mixprec.core.errors import MixprecError, VariantError
from mixprec.core.storage import open_storage
from mixprec.formats.recipe import Recipe
from mixprec.measure.run import run_measure
from mixprec.measure.summary import MeasuredSettings, MeasurementSummary
from mixprec.measure.table import TABLE_COLUMNS, MeasurementRow, load_measurement
from mixprec.quant import QuantSettings
from mixprec.quant.variants import Variant, VariantManifest
from tests.measure_helpers import model_with_splits, small_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _dump(data: object) -> str:
    """How mixprec writes JSON (`mixprec.core.fileio.atomic_write_json`)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


@pytest.fixture(scope="module")
def measured(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished drop-mode table (and its variants) on the tiny Qwen2-MoE."""
    model = model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("artifacts") / "tiny")
    folder = run_measure(small_config(model, tmp_path_factory.mktemp("work"), bits=(2, 4)))
    assert folder is not None
    return folder


def _variant_folder(measured: Path) -> Path:
    return measured.parent.parent / "variants" / "rtn-b2-g64-sym"


def test_manifest_reads_typed_and_writes_the_same_bytes(measured: Path) -> None:
    path = _variant_folder(measured) / "manifest.json"
    text = path.read_text()
    manifest = VariantManifest.from_dict(json.loads(text), str(path))
    assert _dump(manifest.to_dict()) == text
    assert manifest.quant_config == QuantSettings().config(2) and manifest.calibration is None
    assert sum(u.storage_bits for u in manifest.units.values()) == manifest.totals.storage_bits
    assert sum(g.params for g in manifest.groups.values()) == manifest.totals.params
    assert Variant.open(path.parent).manifest == manifest


def test_summary_and_rows_read_typed_and_write_the_same_bytes(measured: Path) -> None:
    text = (measured / "summary.json").read_text()
    summary = load_measurement(measured).summary
    assert _dump(summary.to_dict()) == text
    assert summary.settings.quant == QuantSettings() and summary.settings.measured_bits == (2, 4)
    assert summary.noise_floor_kl("repeat_fp32") == 0.0 and summary.base_kl is None
    assert set(summary.variants) == {"2", "4"} and all(g.modules for g in summary.groups.values())
    table = load_measurement(measured).table
    assert list(table.columns) == TABLE_COLUMNS == [f.name for f in fields(MeasurementRow)]
    storage = open_storage(None, measured)
    (study,) = storage.get_all_studies()
    stored = [t.user_attrs["row"] for t in storage.get_all_trials(study._study_id) if "row" in t.user_attrs]
    assert len(stored) == len(table)
    for row in stored:
        assert MeasurementRow.from_dict(row, "journal.log").to_dict() == row


def test_other_schema_versions_name_the_file_and_the_fix(measured: Path, tmp_path: Path) -> None:
    manifest = json.loads((_variant_folder(measured) / "manifest.json").read_text())
    with pytest.raises(VariantError, match=r"manifest.json: schema_version 2 is not 1; re-run `mixprec quantize`"):
        VariantManifest.from_dict({**manifest, "schema_version": 2}, "work/variants/x/manifest.json")
    summary = json.loads((measured / "summary.json").read_text())
    (tmp_path / "table.csv").write_text((measured / "table.csv").read_text())
    (tmp_path / "summary.json").write_text(_dump({**summary, "schema_version": 2}))
    with pytest.raises(MixprecError, match=rf"{tmp_path / 'summary.json'}: schema_version 2 .*mixprec measure"):
        load_measurement(tmp_path)


def test_stray_and_missing_keys_are_refused_with_their_names(measured: Path) -> None:
    manifest = json.loads((_variant_folder(measured) / "manifest.json").read_text())
    with pytest.raises(VariantError, match=r"m.json: unknown keys \['colour'\]; re-run"):
        VariantManifest.from_dict({**manifest, "colour": "red"}, "m.json")
    with pytest.raises(VariantError, match=r"missing keys \['totals'\]"):
        VariantManifest.from_dict({k: v for k, v in manifest.items() if k != "totals"}, "m.json")
    summary = json.loads((measured / "summary.json").read_text())
    with pytest.raises(MixprecError, match=r"settings: missing keys \['seq_len'\]"):
        MeasurementSummary.from_dict({**summary, "settings": {k: v for k, v in summary["settings"].items()
                                                              if k != "seq_len"}}, "s.json")
    row = MeasurementRow.from_dict(load_measurement(measured).table.iloc[0].to_dict(), "table.csv").to_dict()
    with pytest.raises(MixprecError, match=r"row: missing keys \['dkl'\]"):
        MeasurementRow.from_dict({k: v for k, v in row.items() if k != "dkl"}, "row")


def test_clip_grid_is_recorded_only_when_it_is_not_the_default(measured: Path) -> None:
    """Tables from before clip_grid was a measurement setting keep their summary and fingerprint."""
    settings = load_measurement(measured).summary.settings
    assert "clip_grid" not in settings.to_dict()
    finer = replace(settings, quant=QuantSettings(clip_search=True, clip_grid=48))
    assert finer.to_dict()["clip_grid"] == 48
    assert MeasuredSettings.from_dict(finer.to_dict(), "s") == finer
    config = small_config(measured, measured)
    assert "clip_grid" not in config.settings()
    finer_config = replace(config, quant=finer.quant)
    assert finer_config.settings()["clip_grid"] == 48 and finer_config.folder.name.endswith("-clip-grid48")
    assert finer_config.quant_config(3) == QuantSettings(clip_search=True, clip_grid=48).config(3)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_write_the_same_bytes(path: Path) -> None:
    recipe = Recipe.load(path)
    assert recipe.to_yaml() == path.read_text()
    assert type(recipe.quantizer) is QuantSettings
    chosen = {b for b in recipe.groups.values() if b is not None}
    shared = recipe.quantizer
    # an option label may change the method and group size; symmetry and clip settings stay the recipe's own
    assert {replace(recipe.quant_config(b).settings, method=shared.method, group_size=shared.group_size)
            for b in chosen} == {shared}
