"""Options beyond bits: labels, recipes that pick width, group size and method per group, the compiled format
version 2 that stores them per matrix (version 1 still loads), and `--options` through quantize/search.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_options.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from mixprec.checkpoint.compile import CompileConfig, compile_recipe
from mixprec.checkpoint.load import load
from mixprec.checkpoint.streamed import load as load_any
from mixprec.core.errors import ModelLoadError, QuantConfigError
from mixprec.formats.exl3 import Exl3Overrides, exl3_to_groups, source_bits
from mixprec.formats.recipe import Budget, ModelRef, Recipe, RecipeError
from mixprec.measure.config import MeasureConfig
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint
from mixprec.quant import QuantSettings
from mixprec.quant.options import option_config, option_configs, option_label, option_width, parse_families
from mixprec.quant.variants import ensure_variants
from mixprec.search.inputs import StageConfig, prepare
from mixprec.search.solve import pareto_front
from mixprec.search.study import SearchConfig
from tests.test_compile import recipe_model
from tests.test_search import _tiny_model, mixprec

FAST = QuantSettings(clip_search=False)
#: Per kind, an option of another group size than the recipe's own (64): what one group size cannot express.
MIXED = {GroupKind.ATTENTION: "rtn-b8-g32", GroupKind.ROUTED_EXPERTS: "rtn-b2-g128",
         GroupKind.SHARED_EXPERTS: "rtn-b4-g32", GroupKind.DENSE_MLP: 3}


def test_labels_name_one_config_each() -> None:
    config = option_config("gptq-b4-g32", QuantSettings(symmetric=False))
    assert (config.method, config.bits, config.group_size, config.symmetric) == ("gptq", 4, 32, False)
    assert option_label(config) == "gptq-b4-g32" and option_width("gptq-b4-g32") == 4
    assert option_config(3, FAST) == FAST.config(3) and option_width(None) == 16
    families = parse_families(["rtn-g32", "gptq-g64", "rtn-g32", "rtn-b4-g128"], FAST)
    assert [(f.method, f.group_size) for f in families] == [("rtn", 32), ("gptq", 64), ("rtn", 128)]
    assert all(f.clip_search is False for f in families), "options share the recipe's other settings"
    assert [option_label(c) for c in option_configs(families[:1], [2, 4])] == ["rtn-b2-g32", "rtn-b4-g32"]
    with pytest.raises(QuantConfigError, match="<method>-g<group size>"):
        parse_families(["rtn32"], FAST)
    with pytest.raises(QuantConfigError, match="group_size=48"):
        option_config("rtn-b4-g48", FAST)
    with pytest.raises(QuantConfigError, match="unknown quantization method 'awq'"):
        option_config("awq-b4-g64", FAST)


def _recipe(checkpoint: Checkpoint, by_kind: dict[GroupKind, int | str]) -> Recipe:
    model_map = checkpoint.model_map("layer")
    groups = {g.name: by_kind[g.kind] for g in model_map.select()}
    return Recipe(ModelRef("tiny", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity, FAST,
                  groups)


def test_recipe_with_labels_round_trips_as_version_2(tiny_model_dirs: dict[str, Path]) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    recipe = _recipe(checkpoint, MIXED)
    data = recipe.to_dict()
    assert data["schema_version"] == 2 and recipe.uses_options
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.groups == recipe.groups and again.quant_config("rtn-b2-g128").group_size == 128
    assert set(again.widths().values()) == {8, 2, 4, 3}
    plain = _recipe(checkpoint, dict.fromkeys(MIXED, 4))
    assert plain.to_dict()["schema_version"] == 1, "a widths-only recipe stays readable by older mixprec"
    with pytest.raises(RecipeError, match="option 'rtn-b9-g32'.*bits=9"):
        Recipe.from_dict({**data, "groups": {**data["groups"], next(iter(data["groups"])): "rtn-b9-g32"}})
    with pytest.raises(RecipeError, match="schema_version 3 is not supported"):
        Recipe.from_dict({**data, "schema_version": 3})
    with pytest.raises(RecipeError, match="picks them per group"):
        recipe.require_widths("GGUF")


@pytest.fixture(scope="module")
def compiled(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, Path, Path]:
    """The MIXED recipe's variants and its compiled checkpoint (format version 2)."""
    root = tmp_path_factory.mktemp("options")
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    recipe = _recipe(checkpoint, MIXED)
    configs = [recipe.quant_config(o) for o in dict.fromkeys(recipe.groups.values())]
    ensure_variants(checkpoint, checkpoint.model_map("layer"), configs, root / "work")
    compile_recipe(recipe, checkpoint, root / "work", root / "out", CompileConfig(max_shard_bytes=20_000))
    return recipe, root / "work", root / "out"


def test_compiled_options_load_exactly_with_their_own_group_sizes(
        compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict[str, Path]) -> None:
    recipe, work, out = compiled
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["version"] == 2
    sizes = set(qconfig["group_sizes"].values())
    assert sizes == {32, 64, 128}, sizes
    scales = {name: torch.Size(info.shape) for name, info in _headers(out).items() if name.endswith(".scales")}
    for base, size in qconfig["group_sizes"].items():
        assert scales[f"{base}.scales"][1] == -(-_cols(tiny_model_dirs, base) // size), base
    tokens = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = recipe_model(tiny_model_dirs["qwen2_moe"], work, recipe)(tokens).logits
    assert torch.equal(load(out)(tokens).logits, expected), "the compiled options differ from the searched model"
    streamed = load_any(out, streaming="on")  # each layer dequantized while it runs, at its own group sizes
    assert torch.equal(streamed(tokens).logits, expected)


def _headers(out: Path) -> dict[str, object]:
    from mixprec.checkpoint.shards import checkpoint_shards

    return {name: info for h in checkpoint_shards(out) for name, info in h.tensors.items()}


def _cols(tiny_model_dirs: dict[str, Path], base: str) -> int:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    refs = [r for g in checkpoint.model_map("layer").groups for r in g.weights]
    return next(r.shape[1] for r in refs if r.key == f"{base}.weight" or r.unit == base)


def test_format_versions(compiled: tuple[Recipe, Path, Path], tmp_path: Path,
                         tiny_model_dirs: dict[str, Path]) -> None:
    """A newer version is refused in one line; a version 1 checkpoint (one group size, no group_sizes) loads."""
    import shutil

    from tests.test_compile import compile_tiny

    _, _, out = compiled
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["version"] = 3
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="format version 3 is not supported"):
        load(newer)
    recipe, work, old = compile_tiny(tiny_model_dirs["qwen2_moe"], tmp_path / "v1")
    config = json.loads((old / "config.json").read_text())
    for key in ("group_sizes", "methods"):
        del config["quantization_config"][key]
    config["quantization_config"]["version"] = 1
    (old / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = recipe_model(tiny_model_dirs["qwen2_moe"], work, recipe)(tokens).logits
    assert torch.equal(load(old)(tokens).logits, expected)


@pytest.mark.slow
def test_cli_quantize_and_search_over_options(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--options rtn-g32 rtn-g128`: one table per family, one study over options; the recipe's labels are
    searched options, it fits the budget, its estimate is at least as good as either family's alone, the
    exllamav3 export maps the labels to their widths, and the recipe compiles and loads."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    work, options = tmp_path / "work", ["--options", "rtn-g32", "rtn-g128"]
    code, stdout, err = mixprec("quantize", str(model), "--work", str(work), "--bits", "2", "3", "4",
                                "--no-clip-search", *options, capsys=capsys)
    assert code == 0, err
    assert {p.name for p in (work / "variants").iterdir()} == {
        f"rtn-b{b}-g{g}-sym" for b in (2, 3, 4) for g in (32, 128)}
    table = [str(model), "--work", str(work), "--bits", "2", "3", "4", "--windows", "4", "--seq-len", "32",
             "--granularity", "layer", "--no-clip-search"]
    code, stdout, err = mixprec("measure", *table, *options, capsys=capsys)
    assert code == 0, err
    assert {p.name for p in (work / "measure").iterdir()} == {"drop-layer-g32", "drop-layer-g128"}
    assert stdout.count("wrote ") == 2, "one table per family"
    out, exl3 = tmp_path / "r.yaml", tmp_path / "e.yaml"
    code, stdout, err = mixprec("search", *table[:-1], "--eval-windows", "4", "--no-measure", "--studies-dir",
                                str(tmp_path / "studies"), "--budget", "3", "--trials", "4", *options, "--out",
                                str(out), "--export-exl3", str(exl3), capsys=capsys)
    assert code == 0, err
    assert "options were mapped to their widths" in stdout or not Recipe.load(out).uses_options
    recipe = Recipe.load(out)
    searched = {f"rtn-b{b}-g{g}" for b in (2, 3, 4) for g in (32, 128)}
    assert set(recipe.groups.values()) <= searched | {2, 3, 4}, recipe.groups
    assert recipe.achieved["bpw"] <= 3.0
    rows = {r["recipe"] for r in recipe.provenance["comparison"]}
    assert {"mixprec", "greedy", "greedy-rtn-g128", "hq", "uniform", "uniform-fit-g64"} <= rows, rows
    study = next((tmp_path / "studies").glob("*.db"))
    seeded = {t.user_attrs.get("seed") for t in optuna.load_study(study_name=study.stem,
                                                                  storage=f"sqlite:///{study}").trials}
    assert {"greedy", "greedy-rtn-g128"} <= seeded, "greedy on every family seeds the study"
    overrides = Exl3Overrides.load(exl3)
    bits_of_dir = {s.model_dir: source_bits(s.model_dir) for s in overrides.sources}
    checkpoint = Checkpoint.open(model)
    assert exl3_to_groups(overrides, checkpoint.model_map("layer"), bits_of_dir, base_bits=-1) == recipe.widths()
    code, _, err = mixprec("compile", str(out), "--model", str(model), "--work", str(work), "--out",
                           str(tmp_path / "q"), capsys=capsys)
    assert code == 0, err
    tokens = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.equal(load(tmp_path / "q")(tokens).logits, recipe_model(model, work, recipe)(tokens).logits)
    _joint_estimate_beats_each_family(model, work, tmp_path)


def _joint_estimate_beats_each_family(model: Path, work: Path, tmp_path: Path) -> None:
    """The DP over the joint options is never worse on the estimate than the DP over one family's options."""
    families = parse_families(["rtn-g32", "rtn-g128"], FAST)
    measure = MeasureConfig(work=work, model=str(model), bits=(2, 3, 4), granularity="layer", num_windows=4,
                            seq_len=32, quant=families[0])
    config = StageConfig(work=work, budget=Budget(bpw=3.0), model=str(model), granularity="layer", measure=measure,
                         options=families, search=SearchConfig(studies_dir=tmp_path / "s"))
    inputs = prepare(config)
    assert set(inputs.variants) == {f"rtn-b{b}-g{g}" for b in (2, 3, 4) for g in (32, 128)}
    joint = pareto_front(inputs.problem).best_under(inputs.limit_bits)
    for family in families:
        alone = pareto_front(inputs.family_problem(family)).best_under(inputs.limit_bits)
        assert joint.loss <= alone.loss + 1e-12
        assert {option_config(o, FAST).group_size for o in alone.assignment.values()} == {family.group_size}
