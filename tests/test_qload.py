"""mixprec.load: a compiled checkpoint gives back exactly the model the search measured, or a clear error.

Run: .venv/bin/python -m pytest tests/test_qload.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec.checkpoint.load import is_mixprec_checkpoint, load
from mixprec.checkpoint.shards import INDEX_FILE
from mixprec.core.errors import ModelLoadError
from mixprec.formats.recipe import Recipe
from mixprec.model.arch import GroupKind
from mixprec.quant import QuantSettings
from tests.test_compile import compile_tiny, recipe_model

ASYM_ODD = {GroupKind.ATTENTION: 5, GroupKind.ROUTED_EXPERTS: 3, GroupKind.SHARED_EXPERTS: 5,
            GroupKind.DENSE_MLP: 3}
TWO_WIDTHS = {GroupKind.ATTENTION: 4, GroupKind.ROUTED_EXPERTS: 2, GroupKind.SHARED_EXPERTS: 4,
              GroupKind.DENSE_MLP: 4}


@pytest.fixture(scope="module")
def compiled(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, Path, Path]:
    return compile_tiny(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("qload"))


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_logits_equal_the_in_memory_recipe_model(compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict) -> None:
    recipe, work, out = compiled
    tokens = torch.randint(0, 160, (3, 19))
    loaded = _logits(load(out), tokens)
    expected = _logits(recipe_model(tiny_model_dirs["qwen2_moe"], work, recipe), tokens)
    source = _logits(recipe_model(tiny_model_dirs["qwen2_moe"], work, Recipe(
        recipe.model, recipe.granularity, recipe.quantizer, dict.fromkeys(recipe.groups))), tokens)
    assert torch.equal(loaded, expected), f"max |diff| {(loaded - expected).abs().max():.3g}"
    assert not torch.allclose(loaded, source, atol=1e-4), "the loaded model is not quantized at all"


def test_asymmetric_odd_widths_load_exactly(tiny_model_dirs: dict, tmp_path: Path) -> None:
    settings = QuantSettings(symmetric=False, clip_search=False)
    recipe, work, out = compile_tiny(tiny_model_dirs["qwen2_moe"], tmp_path, ASYM_ODD, settings)
    assert any(k.endswith(".qzeros") for k in json.loads((out / INDEX_FILE).read_text())["weight_map"])
    tokens = torch.randint(0, 160, (2, 11))
    expected = _logits(recipe_model(tiny_model_dirs["qwen2_moe"], work, recipe), tokens)
    assert torch.equal(_logits(load(out), tokens), expected)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_other_families_fill_every_tensor_exactly(model_type: str, tiny_model_dirs: dict, tmp_path: Path) -> None:
    """Mixtral's on-disk block_sparse_moe names and DeepSeek's MLA/dense layers/e_score buffer."""
    recipe, work, out = compile_tiny(tiny_model_dirs[model_type], tmp_path, TWO_WIDTHS)
    loaded = load(out).state_dict()
    expected = recipe_model(tiny_model_dirs[model_type], work, recipe).state_dict()
    assert loaded.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(loaded[k], expected[k])]
    assert differing == [], f"tensors differ from the recipe model: {differing[:5]}"


def test_generate_works(compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict) -> None:
    recipe, work, out = compiled
    prompt = torch.tensor([[5, 17, 42, 7]])
    generated = load(out).generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :4], prompt)
    expected = recipe_model(tiny_model_dirs["qwen2_moe"], work, recipe).generate(prompt, max_new_tokens=5,
                                                                                   do_sample=False)
    assert torch.equal(generated, expected)


def test_package_level_load_and_config(compiled: tuple[Recipe, Path, Path]) -> None:
    _, _, out = compiled
    from mixprec.checkpoint import streamed

    assert mixprec.load is streamed.load
    assert is_mixprec_checkpoint(out)
    model = mixprec.load(out, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert getattr(model.config, "quantization_config", None) is None  # weights are plain floats now


def _copy(out: Path, tmp_path: Path) -> tuple[Path, Path]:
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    return broken, shard


def test_truncated_shard_names_the_file(compiled: tuple[Recipe, Path, Path], tmp_path: Path) -> None:
    broken, shard = _copy(compiled[2], tmp_path)
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ModelLoadError, match=shard.name):
        load(broken)


def test_corrupt_data_names_the_file(compiled: tuple[Recipe, Path, Path], tmp_path: Path) -> None:
    broken, shard = _copy(compiled[2], tmp_path)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=f"{shard.name} is corrupt"):
        load(broken)


def test_corrupt_header_names_the_file(compiled: tuple[Recipe, Path, Path], tmp_path: Path) -> None:
    broken, shard = _copy(compiled[2], tmp_path)
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=shard.name):
        load(broken)


def test_missing_shard_and_foreign_folder(compiled: tuple[Recipe, Path, Path], tiny_model_dirs: dict,
                                          tmp_path: Path) -> None:
    broken, shard = _copy(compiled[2], tmp_path)
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load(broken)
    with pytest.raises(ModelLoadError, match="not a `mixprec compile` output"):
        load(tiny_model_dirs["qwen2_moe"])
