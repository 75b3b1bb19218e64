"""Recipe YAML: lossless round trips, strict loading with nearest-name errors, checks against a model.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_recipe.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixprec.core.errors import FingerprintMismatchError
from mixprec.formats.recipe import Budget, ModelRef, Recipe, RecipeError
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import Granularity, ModelMap
from mixprec.quant import QuantSettings


@pytest.fixture(scope="module")
def fine_map(tiny_model_dirs: dict[str, Path]) -> tuple[ModelMap, str]:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    return checkpoint.model_map("fine"), checkpoint.fingerprint


def make_recipe(model_map: ModelMap, fingerprint: str) -> Recipe:
    names = [g.name for g in model_map.select(DEFAULT_QUANTIZED_KINDS)]
    groups: dict[str, int | None] = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}
    groups[names[0]] = None
    return Recipe(
        model=ModelRef("tiny", model_map.model_type, fingerprint),
        granularity=model_map.granularity,
        quantizer=QuantSettings(group_size=64),
        groups=groups,
        budget=Budget(bpw=3.0),
        achieved={"bpw": 2.987654321, "gib": 1.5e-5, "storage_bits": 123456, "params": 41328},
        provenance={"solver": "search", "measurement": {"fingerprint": "ab" * 32, "mode": "drop"},
                    "seeds": ["dp", "greedy"], "calibration": {"seq_len": 256, "num_windows": 16}},
        kl={"predicted": 0.0123, "calibration": 0.0119, "calibration_se": 0.0004, "evaluation": 0.0121},
    )


def test_yaml_round_trip_is_lossless(fine_map: tuple[ModelMap, str], tmp_path: Path) -> None:
    recipe = make_recipe(*fine_map)
    path = tmp_path / "recipes" / "r.yaml"
    recipe.save(path)
    loaded = Recipe.load(path)
    assert loaded == recipe
    assert loaded.to_yaml() == recipe.to_yaml()
    text = path.read_text()
    assert text.startswith("schema_version: 1\n"), "schema_version comes first"
    assert list(yaml.safe_load(text)["groups"]) == list(recipe.groups), "group order is kept"
    loaded.check_model(fine_map[0], fine_map[1])


def test_bad_yaml_gives_clear_errors(fine_map: tuple[ModelMap, str]) -> None:
    data = make_recipe(*fine_map).to_dict()
    with pytest.raises(RecipeError, match="unknown key 'granulrity'; nearest valid: granularity"):
        Recipe.from_dict({**{k: v for k, v in data.items() if k != "granularity"}, "granulrity": "fine"})
    with pytest.raises(RecipeError, match="unknown key 'group_sise'; nearest valid: group_size"):
        Recipe.from_dict({**data, "quantizer": {"group_sise": 64}})
    with pytest.raises(RecipeError, match="bits 9 is not one of"):
        Recipe.from_dict({**data, "groups": {**data["groups"], "layers.0.attn.q": 9}})
    with pytest.raises(RecipeError, match="exactly one of bpw or gib"):
        Recipe.from_dict({**data, "budget": {"bpw": 3.0, "gib": 1.0}})
    with pytest.raises(RecipeError, match="schema_version 7"):
        Recipe.from_dict({**data, "schema_version": 7})
    with pytest.raises(RecipeError, match="exllamav3 override"):
        Recipe.from_dict({**data, "kind": "exl3"})
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("groups: [\n")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load("/nonexistent/recipe.yaml")


def test_recipe_refuses_other_models_and_unknown_groups(fine_map: tuple[ModelMap, str],
                                                        tiny_model_dirs: dict[str, Path]) -> None:
    model_map, fingerprint = fine_map
    recipe = make_recipe(model_map, fingerprint)
    with pytest.raises(FingerprintMismatchError):
        recipe.check_model(model_map, "0" * 64)
    typo = Recipe(recipe.model, recipe.granularity, recipe.quantizer,
                  {**recipe.groups, "layers.1.atn.q": 4})
    with pytest.raises(RecipeError, match="unknown group 'layers.1.atn.q'; nearest valid: layers.1.attn.q"):
        typo.check_model(model_map)
    partial = Recipe(recipe.model, recipe.granularity, recipe.quantizer, dict(list(recipe.groups.items())[:3]))
    with pytest.raises(RecipeError, match="assigns no bits"):
        partial.check_model(model_map)
    layer_map = Checkpoint.open(tiny_model_dirs["qwen2_moe"]).model_map(Granularity.LAYER)
    with pytest.raises(RecipeError, match="granularity 'fine' differs"):
        recipe.check_model(layer_map)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["model"].update(fingerprint=123456), "model.fingerprint must be a non-empty string"),
    (lambda d: d.update(budget={"bpw": "abc"}), "budget must be a positive finite number"),
    (lambda d: d.update(budget={"bpw": float("nan")}), "budget must be a positive finite number"),
    (lambda d: d.update(budget="abc"), "'budget' must be a mapping"),
    (lambda d: d.update(achieved=5), "'achieved' must be a mapping"),
    (lambda d: d.update(kl={"predicted": "low"}), "kl.predicted must be a finite number"),
    (lambda d: d["quantizer"].update(group_size="64"), "group_size must be an integer, got '64'"),
    (lambda d: d["groups"].update({next(iter(d["groups"])): 4.0}), "bits 4.0 is not one of"),
    (lambda d: d["model"].pop("name"), "required key 'name' is missing"),
])
def test_wrong_types_are_recipe_errors(fine_map: tuple[ModelMap, str], change, match: str) -> None:  # noqa: ANN001
    """Each of these was a TypeError traceback, a silently accepted value or a misleading message (issue 12)."""
    data = make_recipe(*fine_map).to_dict()
    change(data)
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml(yaml.safe_dump(data, sort_keys=False))


def test_unreadable_recipe_files_are_recipe_errors(fine_map: tuple[ModelMap, str], tmp_path: Path) -> None:
    text = make_recipe(*fine_map).to_yaml()
    first = text.split("groups:\n", 1)[1].splitlines()[0]
    cases = {"deep.yaml": ("groups: " + "[" * 5000 + "]" * 5000).encode(), "latin1.yaml": b"model: caf\xe9\n",
             "dupe.yaml": text.replace(first, f"{first}\n{first.split(':')[0]}: 8").encode()}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(RecipeError, match="nested too deeply"):
        Recipe.load(tmp_path / "deep.yaml")
    with pytest.raises(RecipeError, match="not UTF-8"):
        Recipe.load(tmp_path / "latin1.yaml")
    with pytest.raises(RecipeError, match="duplicate key"):
        Recipe.load(tmp_path / "dupe.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        Recipe.load(tmp_path)
