"""compile: sharded, bit-packed checkpoint with valid index and metadata, exact sizes, clean failures.

Run: .venv/bin/python -m pytest tests/test_compile.py -q

The helpers here (`make_recipe`, `compile_tiny`, `recipe_model`) are shared with test_qload.py and
test_evaluate.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mixprec.checkpoint.compile import CompileConfig, compile_recipe
from mixprec.checkpoint.pack import unpack_codes
from mixprec.checkpoint.qformat import REPORT_FILE, CompileError
from mixprec.checkpoint.shards import INDEX_FILE, checkpoint_shards
from mixprec.cli import main
from mixprec.core.errors import FingerprintMismatchError, ModelLoadError, VariantError
from mixprec.formats.recipe import ModelRef, Recipe
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantSettings
from mixprec.quant.variants import Variant, apply_group, ensure_variants

#: Tiny limit so the tiny model is written as several shards.
SMALL_SHARDS = CompileConfig(max_shard_bytes=20_000)
#: Mixed bits per kind; the first attention group stays at original precision (null).
MIXED = {GroupKind.ATTENTION: 8, GroupKind.ROUTED_EXPERTS: 2, GroupKind.SHARED_EXPERTS: 4, GroupKind.DENSE_MLP: 4}
FAST = QuantSettings(clip_search=False)


def make_recipe(checkpoint: Checkpoint, bits_by_kind: dict[GroupKind, int] = MIXED,
                settings: QuantSettings = FAST, null_first: bool = True) -> Recipe:
    """A recipe over the default kinds with `bits_by_kind`, the first group kept at original precision."""
    model_map = checkpoint.model_map("layer")
    groups: dict[str, int | None] = {g.name: bits_by_kind[g.kind] for g in model_map.select()}
    if null_first:
        groups[next(iter(groups))] = None
    return Recipe(ModelRef("tiny", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                  settings, groups)


def compile_tiny(model_dir: Path, root: Path, bits_by_kind: dict[GroupKind, int] = MIXED,
                 settings: QuantSettings = FAST, config: CompileConfig = SMALL_SHARDS) -> tuple[Recipe, Path, Path]:
    """Make the variants a recipe needs in root/work and compile it to root/out; returns (recipe, work, out)."""
    checkpoint = Checkpoint.open(model_dir)
    recipe = make_recipe(checkpoint, bits_by_kind, settings)
    widths = sorted({b for b in recipe.groups.values() if b is not None})
    ensure_variants(checkpoint, checkpoint.model_map("layer"), [settings.config(b) for b in widths], root / "work")
    compile_recipe(recipe, checkpoint, root / "work", root / "out", config)
    return recipe, root / "work", root / "out"


def recipe_model(model_dir: Path, work: Path, recipe: Recipe) -> torch.nn.Module:
    """The in-memory model the search measures: fp32 source with each group's dequantized variant applied."""
    checkpoint = Checkpoint.open(model_dir)
    model = load_model(checkpoint)
    model_map = checkpoint.model_map(recipe.granularity)
    params = dict(model.named_parameters())
    for name, bits in recipe.groups.items():
        if bits is not None:
            variant = Variant.open(work / "variants" / recipe.quant_config(bits).variant_id)
            apply_group(params, model_map.group(name), variant)
    return model


def expected_bits(checkpoint: Checkpoint, recipe: Recipe) -> dict[str, int]:
    """base name -> bits, derived from the recipe independently of the compiler."""
    model_map = checkpoint.model_map(recipe.granularity)
    return {ref.key.removesuffix(".weight"): bits for name, bits in recipe.groups.items() if bits is not None
            for ref in model_map.group(name).weights}


@pytest.fixture(scope="module")
def compiled(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, Path, Path]:
    return compile_tiny(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("compile"))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_shards_and_index_are_valid(compiled: tuple[Recipe, Path, Path]) -> None:
    recipe, _, out = compiled
    index = json.loads((out / INDEX_FILE).read_text())
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2 and all((out / f).exists() for f in shard_files)
    total = 0
    for name in shard_files:
        with safe_open(out / name, "pt") as handle:
            assert set(handle.keys()) == {k for k, v in index["weight_map"].items() if v == name}
            meta = handle.metadata()
            total += sum(handle.get_tensor(k).nbytes for k in handle.keys())
        assert meta["format"] == "pt" and meta["mixprec.recipe"] == recipe.to_yaml()
        assert Recipe.from_yaml(meta["mixprec.recipe"]) == recipe
    assert index["metadata"]["total_size"] == total


def test_per_tensor_bits_equal_the_recipe(compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict) -> None:
    recipe, _, out = compiled
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    expected = expected_bits(checkpoint, recipe)
    shapes = {ref.key.removesuffix(".weight"): ref.shape for g in checkpoint.model_map("layer").groups
              for ref in g.weights}
    recorded: dict[str, int] = {}
    for header in checkpoint_shards(out):
        recorded.update(json.loads(header.metadata["mixprec.tensor_bits"]))
        for name, info in header.tensors.items():
            if name.endswith(".qweight"):
                base = name.removesuffix(".qweight")
                rows, cols = shapes[base]
                assert info.dtype == "U8" and info.shape == (rows, -(-cols * expected[base] // 8)), name
    assert recorded == expected
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == expected
    assert len(set(expected.values())) == 3 and len(expected) < sum(1 for _ in checkpoint.key_to_file)


def test_untouched_tensors_are_copied_exactly(compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict) -> None:
    recipe, _, out = compiled
    source = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    quantized = {f"{base}.weight" for base in expected_bits(source, recipe)}
    stored = {name: h.path for h in checkpoint_shards(out) for name in h.tensors}
    assert not quantized & set(stored), "a quantized matrix was also stored in full precision"
    kept = [k for k in source.key_to_file if k not in quantized]
    assert any("layernorm" in k for k in kept) and any("mlp.gate.weight" in k for k in kept)
    assert any(k.startswith("model.layers.0.self_attn") for k in kept)  # the null group
    for key in kept:
        with safe_open(stored[key], "pt") as handle:
            copy = handle.get_tensor(key)
        original = source.read(key)
        assert copy.dtype == original.dtype and torch.equal(copy, original), key


def test_codes_and_scales_are_the_variants(compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict) -> None:
    recipe, work, out = compiled
    source = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    stored = {name: h.path for h in checkpoint_shards(out) for name in h.tensors}
    for name, bits in recipe.groups.items():
        if bits is None:
            continue
        variant = Variant.open(work / "variants" / recipe.quant_config(bits).variant_id)
        ref = source.model_map("layer").group(name).weights[-1]
        base = ref.key.removesuffix(".weight")
        with safe_open(stored[f"{base}.qweight"], "pt") as handle:
            codes = unpack_codes(handle.get_tensor(f"{base}.qweight"), bits, ref.shape)
            scales = handle.get_tensor(f"{base}.scales")
        q = variant.quantized(ref)
        assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales), name


def test_size_report_matches_prediction(compiled: tuple[Recipe, Path, Path]) -> None:
    _, _, out = compiled
    report = json.loads((out / REPORT_FILE).read_text())
    predicted, actual = report["predicted"]["quantized_bytes"], report["actual"]["quantized_bytes"]
    assert abs(actual / predicted - 1) < 0.02
    assert actual == predicted  # every input dimension of the tiny model is a multiple of 8: no row padding
    files = sum(p.stat().st_size for p in out.iterdir() if p.name != REPORT_FILE)
    assert report["actual"]["folder_bytes"] == files
    assert report["actual"]["tensor_bytes"] == json.loads((out / INDEX_FILE).read_text())["metadata"]["total_size"]
    assert set(report["shards"]) == {p.name for p in out.glob("model-*.safetensors")}


def test_sharded_output_loads_with_from_pretrained(tiny_model_dirs: dict, tmp_path: Path) -> None:
    """An all-null recipe compiles to a plain sharded checkpoint that transformers itself loads."""
    from transformers import AutoModelForCausalLM

    source = tiny_model_dirs["qwen2_moe"]
    checkpoint = Checkpoint.open(source)
    recipe = make_recipe(checkpoint)
    recipe = replace(recipe, groups=dict.fromkeys(recipe.groups))
    compile_recipe(recipe, checkpoint, tmp_path / "work", tmp_path / "out", SMALL_SHARDS)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager").eval()
    tokens = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, load_model(checkpoint)(tokens).logits)


def test_recipe_for_another_model_is_refused(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path) -> None:
    recipe, work, _ = compiled
    other = replace(recipe, model=replace(recipe.model, fingerprint="0" * 64))
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        compile_recipe(other, Checkpoint.open(tiny_model_dirs["qwen2_moe"]), work, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_missing_variant_names_folder_and_command(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path) -> None:
    recipe, work, _ = compiled
    groups = dict(recipe.groups)
    groups[next(n for n, b in groups.items() if b == 2)] = 3
    with pytest.raises(CompileError, match=r"rtn-b3-g64-sym.*mixprec quantize .*--bits 3"):
        compile_recipe(replace(recipe, groups=groups), Checkpoint.open(tiny_model_dirs["qwen2_moe"]), work,
                       tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_variant_is_refused(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path, damage: str) -> None:
    recipe, work, _ = compiled
    shutil.copytree(work, tmp_path / "work")
    weights = tmp_path / "work" / "variants" / recipe.quant_config(2).variant_id / "quantized.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-50] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VariantError, match="rtn-b2-g64-sym"):
        compile_recipe(recipe, Checkpoint.open(tiny_model_dirs["qwen2_moe"]), tmp_path / "work", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_source_shard_is_refused(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path,
                                         damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, work, _ = compiled
    shutil.copytree(tiny_model_dirs["qwen2_moe"], tmp_path / "model")
    shard = tmp_path / "model" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-1000]
    else:
        data[-500] ^= 0xFF
    shard.write_bytes(bytes(data))
    recipe.save(tmp_path / "recipe.yaml")
    code = main(["compile", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--model",
                 str(tmp_path / "model"), "--work", str(work)])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.safetensors" in err or "corrupt" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    if damage == "truncate":
        with pytest.raises(ModelLoadError, match="model.safetensors"):
            Checkpoint.open(tmp_path / "model")


def test_existing_foreign_folder_is_not_replaced(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path) -> None:
    recipe, work, _ = compiled
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(CompileError, match="not a mixprec compile output"):
        compile_recipe(recipe, Checkpoint.open(tiny_model_dirs["qwen2_moe"]), work, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_cli_compile_prints_predicted_and_actual(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe, work, _ = compiled
    recipe.save(tmp_path / "recipe.yaml")
    code = main(["compile", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--model",
                 str(tiny_model_dirs["qwen2_moe"]), "--work", str(work), "--max-shard-size", "30KB"])
    out = capsys.readouterr().out
    assert code == 0 and "quantized tensors" in out and "1.00000" in out
    assert all(h.data_bytes <= 30_000 or len(h.tensors) <= 3 for h in checkpoint_shards(tmp_path / "out"))


def test_cli_compiles_an_exllamav3_override_yaml(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mixprec.formats.exl3 import recipe_to_exl3

    recipe, work, _ = compiled
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    recipe = make_recipe(checkpoint, null_first=False)
    sources = {b: work / "variants" / recipe.quant_config(b).variant_id for b in (2, 4, 8)}
    recipe_to_exl3(recipe.groups, checkpoint.model_map("layer"), sources, base_bits=4).save(tmp_path / "ov.yaml")
    args = ["compile", str(tmp_path / "ov.yaml"), "--out", str(tmp_path / "out"), "--model",
            str(tiny_model_dirs["qwen2_moe"]), "--granularity", "layer"]
    assert main(args) == 2 and "--base-bits" in capsys.readouterr().err
    assert main([*args, "--base-bits", "4"]) == 0
    compiled_groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["groups"]
    assert compiled_groups == recipe.groups


def test_earlier_output_with_user_files_is_not_replaced(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Recompiling into an earlier output replaces it whole: only when it holds nothing else, or with --force."""
    recipe, work, out = compiled
    shutil.copytree(out, tmp_path / "out")
    recipe.save(tmp_path / "recipe.yaml")
    argv = ["compile", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--model",
            str(tiny_model_dirs["qwen2_moe"]), "--work", str(work)]
    assert main(argv) == 0, "an earlier output holding only what compile wrote is ours to replace"
    (tmp_path / "out" / "NOTES.md").write_text("keep me")
    (tmp_path / "out" / "results").mkdir()
    assert main(argv) == 2
    assert "NOTES.md" in capsys.readouterr().err and (tmp_path / "out" / "NOTES.md").read_text() == "keep me"
    assert (tmp_path / "out" / "results").is_dir()
    assert main([*argv, "--force"]) == 0 and not (tmp_path / "out" / "NOTES.md").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompileError, match="existing file"):
        compile_recipe(recipe, Checkpoint.open(tiny_model_dirs["qwen2_moe"]), work, tmp_path / "file")



def test_cli_compiles_an_all_null_recipe(compiled: tuple, tiny_model_dirs: dict, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """All groups null is a plain re-shard: it printed a traceback (bpw of no quantized weight) after writing."""
    recipe, work, _ = compiled
    replace(recipe, groups=dict.fromkeys(recipe.groups)).save(tmp_path / "null.yaml")
    code = main(["compile", str(tmp_path / "null.yaml"), "--out", str(tmp_path / "out"), "--model",
                 str(tiny_model_dirs["qwen2_moe"]), "--work", str(work)])
    assert code == 0 and "no quantized weights" in capsys.readouterr().out
