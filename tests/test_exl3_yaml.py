"""exllamav3 override YAML: matching semantics of the real loader, writer coverage, round trips, errors.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_exl3_yaml.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixprec.formats.exl3 import (
    Exl3Override,
    Exl3Overrides,
    Exl3Source,
    Exl3YamlError,
    compile_star_globs,
    exl3_to_groups,
    group_modules,
    group_patterns,
    recipe_to_exl3,
    source_bits,
)
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import ModelMap


def test_globs_fullmatch_and_star_crosses_dots() -> None:
    layer1 = compile_star_globs(["model.layers.1.*"])
    assert layer1.fullmatch("model.layers.1.self_attn.q_proj.trellis")
    assert not layer1.fullmatch("model.layers.10.self_attn.q_proj.trellis"), "the dot after 1 is literal"
    attn = compile_star_globs(["*.self_attn.*"])
    assert attn.fullmatch("model.layers.7.self_attn.o_proj.suh"), "* crosses dots"
    assert not compile_star_globs(["model.layers.1.self_attn"]).fullmatch("model.layers.1.self_attn.q_proj.trellis"), \
        "a bare module key without .* matches no tensor"
    assert compile_star_globs(["a.**.b"]).pattern == compile_star_globs(["a.*.b"]).pattern, "runs of * collapse"
    assert not compile_star_globs(["model.layers.[1].*"]).fullmatch("model.layers.1.x"), "[ is literal"
    assert compile_star_globs(["model.layers.[1].*"]).fullmatch("model.layers.[1].x")
    assert compile_star_globs(["x", "*"]).fullmatch("anything"), "a lone * matches every tensor"
    assert not compile_star_globs([]).fullmatch(""), "no keys match nothing"
    assert compile_star_globs(["  model.*  "]).fullmatch("model.norm.weight"), "keys are stripped"


def test_later_source_wins_and_duplicate_keys() -> None:
    text = """
sources:
  - {id: hi, model_dir: /q/6bpw}
  - {id: mid, model_dir: /q/4bpw}
overrides:
  - {key: "*.self_attn.*", source: hi}
  - {key: "model.layers.0.*", source: mid}
  - {key: "model.layers.3.mlp.*", source: hi}
  - {key: "model.layers.3.mlp.*", source: mid}
"""
    overrides = Exl3Overrides.from_yaml(text)
    # hi is grouped first, mid second; mid was added later, so it wins where both match
    assert overrides.resolve("model.layers.0.self_attn.q_proj.trellis") == "/q/4bpw"
    assert overrides.resolve("model.layers.5.self_attn.q_proj.trellis") == "/q/6bpw"
    # duplicate key: the last entry's source wins
    assert overrides.resolve("model.layers.3.mlp.experts.1.down_proj.trellis") == "/q/4bpw"
    assert overrides.resolve("model.layers.5.mlp.experts.1.down_proj.trellis") is None, "no key -> base quant"


def test_same_dir_under_two_ids_merges_into_one_source() -> None:
    overrides = Exl3Overrides(
        (Exl3Source("a", "/q/4"), Exl3Source("b", "/q/6"), Exl3Source("c", "/q/4")),
        (Exl3Override("model.layers.0.*", "a"), Exl3Override("*.q_proj.*", "b"), Exl3Override("*.k_proj.*", "c")))
    # /q/4 appears first (through a), so /q/6 is added later and wins for layer 0's q_proj
    assert overrides.resolve("model.layers.0.self_attn.q_proj.trellis") == "/q/6"
    assert overrides.resolve("model.layers.0.self_attn.k_proj.trellis") == "/q/4"


@pytest.fixture(scope="module")
def maps(tiny_model_dirs: dict[str, Path]) -> dict[tuple[str, str], ModelMap]:
    return {(t, g): Checkpoint.open(tiny_model_dirs[t]).model_map(g)
            for t in ("qwen2_moe", "mixtral", "deepseek_v3") for g in ("layer", "fine", "expert")}


def test_patterns_cover_their_group_and_nothing_else(maps: dict[tuple[str, str], ModelMap]) -> None:
    for (model_type, granularity), model_map in maps.items():
        modules = group_modules(model_map)
        patterns = group_patterns(model_map)
        for name, keys in patterns.items():
            regex = compile_star_globs(keys)
            for other, mods in modules.items():
                for module in mods:
                    hit = regex.fullmatch(module + ".trellis") is not None
                    assert hit == (other == name), f"{model_type}/{granularity}: {keys} vs {module} ({other})"
    fine = group_patterns(maps[("qwen2_moe", "fine")])
    assert fine["layers.1.experts.gate_up"] == ["model.layers.1.mlp.experts.*.gate_proj.*",
                                                "model.layers.1.mlp.experts.*.up_proj.*"]
    assert group_patterns(maps[("qwen2_moe", "layer")])["layers.1.attn"] == ["model.layers.1.self_attn.*"]


def _groups(model_map: ModelMap, pick: list[int]) -> dict[str, int | None]:
    names = [g.name for g in model_map.select(DEFAULT_QUANTIZED_KINDS)]
    return {n: pick[i % len(pick)] for i, n in enumerate(names)}


def test_recipe_round_trip_through_override_yaml(maps: dict[tuple[str, str], ModelMap], tmp_path: Path) -> None:
    sources = {b: f"/quants/{b}bpw" for b in (2, 3, 4, 6)}
    for model_map in maps.values():
        groups = _groups(model_map, [3, 6, 2, 4, 4])
        for base in (None, 4):
            overrides = recipe_to_exl3(groups, model_map, sources, base_bits=base)
            keys = [o.key for o in overrides.overrides]
            assert len(keys) == len(set(keys)), "keys must not repeat"
            path = tmp_path / "override.yaml"
            overrides.save(path)
            again = Exl3Overrides.load(path)
            assert again == overrides
            assert yaml.safe_load(path.read_text())["sources"][0]["model_dir"].startswith("/quants/")
            bits_of_dir = {d: b for b, d in sources.items()}
            assert exl3_to_groups(again, model_map, bits_of_dir, base_bits=base or 2) == groups


def test_bad_override_yaml_errors(maps: dict[tuple[str, str], ModelMap], caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(Exl3YamlError, match="unknown key 'overides'; nearest valid: overrides"):
        Exl3Overrides.from_yaml("sources: []\noverides: []\n")
    with pytest.raises(Exl3YamlError, match="names source 'hii'.*nearest: hi"):
        Exl3Overrides.from_yaml("sources: [{id: hi, model_dir: /a}]\noverrides: [{key: 'x.*', source: hii}]\n")
    with pytest.raises(Exl3YamlError, match=r"sources\[0\]: unknown key 'dir'"):
        Exl3Overrides.from_yaml("sources: [{id: hi, dir: /a}]\noverrides: []\n")
    with pytest.raises(Exl3YamlError, match="not valid YAML"):
        Exl3Overrides.from_yaml("sources: [\n")
    model_map = maps[("qwen2_moe", "layer")]
    split = Exl3Overrides((Exl3Source("hi", "/q/6"),), (Exl3Override("model.layers.1.self_attn.q_proj.*", "hi"),))
    with pytest.raises(Exl3YamlError, match="layers.1.attn.*several widths.*finer granularity"):
        exl3_to_groups(split, model_map, {"/q/6": 6}, base_bits=4)
    with pytest.raises(Exl3YamlError, match="no known bit width"):
        exl3_to_groups(split, model_map, {"/q/4": 4}, base_bits=4)
    typo = Exl3Overrides((Exl3Source("hi", "/q/6"),), (Exl3Override("model.layer.1.self_attn.*", "hi"),))
    with caplog.at_level("WARNING"):
        exl3_to_groups(typo, model_map, {"/q/6": 6}, base_bits=4)
    assert "'model.layer.1.self_attn.*' matches no quantized tensor" in caplog.text
    groups = _groups(model_map, [4])
    with pytest.raises(Exl3YamlError, match=r"no source folder for \[4\] bits"):
        recipe_to_exl3(groups, model_map, {3: "/q/3"})
    with pytest.raises(Exl3YamlError, match="null"):
        recipe_to_exl3({**groups, "layers.0.attn": None}, model_map, {4: "/q/4"})


def test_source_bits(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "manifest.json").write_text(json.dumps({"quant_config": {"bits": 3}}))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4.0}}))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4.25}}))
    assert source_bits(tmp_path / "v") == 3
    assert source_bits(tmp_path / "e") == 4
    with pytest.raises(Exl3YamlError, match="not an integer width"):
        source_bits(tmp_path / "f")
    with pytest.raises(Exl3YamlError, match="neither a mixprec variant"):
        source_bits(tmp_path)
