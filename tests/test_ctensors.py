"""compile --format compressed-tensors: checked by compressed-tensors' own decompressor and config model.

Run: .venv/bin/python -m pytest tests/test_ctensors.py -q

Every width 2..8 at group sizes 32/64/128, symmetric and asymmetric, goes through one compile each per
(group size, symmetry): the recipe spreads the seven widths over expert-granularity groups of a tiny
Qwen2-MoE whose in-features (128, 256) divide every group size. compressed-tensors'
`CompressedTensorsDequantizer` (its model-free reader: config model, target matching, the pack-quantized
decompressor, and a check that no packed tensor is left over) must rebuild every quantized matrix exactly
as `mixprec.load` of the same recipe compiled in mixprec's format, both in fp16, the dtype
compressed-tensors dequantizes in (the scales' dtype); every other tensor must be the source's.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import compressed_tensors as ct
import pytest
import torch
from compressed_tensors.compressors.pack_quantized import pack_to_int32
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

from mixprec.checkpoint.compile import CompileConfig, compile_recipe
from mixprec.checkpoint.ctensors import compile_ctensors, pack_int32, vllm_fusion_conflicts
from mixprec.checkpoint.load import load
from mixprec.checkpoint.qformat import CompileError
from mixprec.checkpoint.shards import checkpoint_shards
from mixprec.cli import main
from mixprec.formats.recipe import ModelRef, Recipe
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint
from mixprec.quant import INTEGER_CODE_BITS, SUPPORTED_GROUP_SIZES, QuantSettings
from mixprec.quant.variants import ensure_variants
from tests.tiny_models import TINY_CONFIGS, save_tiny_model

#: Wider than the shared tiny config so 128 divides every in-features (hidden 128, MLPs 256/128).
WIDE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=128)
SHARDS = CompileConfig(max_shard_bytes=200_000)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2_moe", tmp_path_factory.mktemp("wide") / "qwen2_moe", **WIDE)


def all_widths_recipe(checkpoint: Checkpoint, settings: QuantSettings, nulls: tuple[str, ...] = ()) -> Recipe:
    """Expert granularity, widths 2..8 cycling over the default kinds' groups (every width used), `nulls`
    kept at original precision."""
    groups = [g.name for g in checkpoint.model_map("expert").select()]
    assert len(groups) >= len(INTEGER_CODE_BITS) + len(nulls)
    bits: dict[str, int | None] = dict(zip(groups, itertools.cycle(INTEGER_CODE_BITS), strict=False))
    bits.update(dict.fromkeys(nulls))
    return Recipe(ModelRef("wide", checkpoint.model_type, checkpoint.fingerprint), checkpoint.model_map("expert")
                  .granularity, settings, dict(bits))


def dequantized_by_ct(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors folder as compressed-tensors itself reads it back (fp16)."""
    reader = CompressedTensorsDequantizer(folder, dtype=torch.float16)
    tensors: dict[str, torch.Tensor] = {}
    for header in checkpoint_shards(folder):
        tensors.update(reader.validate(load_file(header.path)))  # process() + no leftover packed tensors
    return tensors


def assert_ct_rebuilds_mixprec_load(checkpoint: Checkpoint, recipe: Recipe, root: Path,
                                    config: CompileConfig = SHARDS) -> dict:
    """Compile `recipe` in both formats under `root`; compressed-tensors' reader of one must give exactly
    `mixprec.load` of the other (fp16) for every quantized matrix and the source for every other tensor."""
    used = {o for o in recipe.groups.values() if o is not None}  # widths or option labels
    ensure_variants(checkpoint, checkpoint.model_map(recipe.granularity),
                    sorted({recipe.quant_config(o) for o in used}, key=str), root / "work")
    compile_recipe(recipe, checkpoint, root / "work", root / "mixprec", config)
    report = compile_ctensors(recipe, checkpoint, root / "work", root / "ct", config)
    assert len(report["shards"]) > 1 and report["compressed_tensors_validated"] == ct.__version__
    decompressed = dequantized_by_ct(root / "ct")
    params = dict(load(root / "mixprec", dtype=torch.float16).named_parameters())
    model_map = checkpoint.model_map(recipe.granularity)
    for name, bits in recipe.groups.items():
        for ref in model_map.group(name).weights if bits is not None else ():
            got = decompressed.pop(ref.key)
            assert got.dtype == torch.float16 and torch.equal(got, ref.slice_memory(params[ref.param])), \
                f"{ref.key} at {bits} bits"
    assert decompressed, "the unquantized tensors are missing"
    for key, tensor in decompressed.items():
        assert torch.equal(tensor, checkpoint.read(key)), key
    return report


@pytest.mark.parametrize(("group_size", "symmetric"), list(itertools.product(SUPPORTED_GROUP_SIZES, (True, False))))
def test_ct_decompressor_rebuilds_what_mixprec_load_reads(wide_model: Path, tmp_path: Path, group_size: int,
                                                          symmetric: bool) -> None:
    checkpoint = Checkpoint.open(wide_model)
    recipe = all_widths_recipe(checkpoint, QuantSettings(group_size=group_size, symmetric=symmetric))
    assert set(recipe.groups.values()) == set(INTEGER_CODE_BITS)
    assert_ct_rebuilds_mixprec_load(checkpoint, recipe, tmp_path)


def test_option_recipe_gets_one_config_group_per_width_and_group_size(wide_model: Path, tmp_path: Path) -> None:
    """A recipe whose groups pick their own group size (option labels) is exported with one config group per
    (width, group size), and compressed-tensors' reader still rebuilds exactly what `mixprec.load` reads."""
    checkpoint = Checkpoint.open(wide_model)
    model_map = checkpoint.model_map("expert")
    groups = [g.name for g in model_map.select()]
    wanted = {(bits, size) for bits in (2, 4, 8) for size in SUPPORTED_GROUP_SIZES}
    labels = itertools.cycle(sorted(f"rtn-b{bits}-g{size}" for bits, size in wanted))
    recipe = Recipe(ModelRef("wide", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    QuantSettings(), {name: next(labels) for name in groups})
    assert recipe.uses_options
    assert_ct_rebuilds_mixprec_load(checkpoint, recipe, tmp_path)
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in qconfig["config_groups"].values()} \
        == wanted


def test_experts_sharing_a_width_get_one_target(wide_model: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(wide_model)
    model_map = checkpoint.model_map("layer")
    widths = {GroupKind.ATTENTION: 8, GroupKind.ROUTED_EXPERTS: 2, GroupKind.SHARED_EXPERTS: 5, GroupKind.DENSE_MLP: 3}
    recipe = Recipe(ModelRef("wide", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    QuantSettings(group_size=32, symmetric=False), {g.name: widths[g.kind] for g in model_map.select()})
    assert_ct_rebuilds_mixprec_load(checkpoint, recipe, tmp_path)
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = {s["weights"]["num_bits"]: s["targets"] for s in qconfig["config_groups"].values()}
    assert targets[2] == [rf"re:^model\.layers\.1\.mlp\.experts\.\d+\.{p}$" for p in ("down_proj", "gate_proj",
                                                                                         "up_proj")]
    assert all(t.startswith("re:^model") for t in targets[8]) and len(targets[8]) == 8  # q, k, v, o of 2 layers


def test_config_is_valid_for_compressed_tensors(wide_model: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(wide_model)
    settings = QuantSettings(group_size=64, symmetric=False)
    # layers.1.experts.2 stays unquantized: it must be in ignore and in no target
    recipe = all_widths_recipe(checkpoint, settings, nulls=("layers.1.experts.2",))
    ensure_variants(checkpoint, checkpoint.model_map("expert"), [settings.config(b) for b in INTEGER_CODE_BITS],
                    tmp_path / "work")
    compile_ctensors(recipe, checkpoint, tmp_path / "work", tmp_path / "ct")
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qconfig)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    assert parsed.quantization_status == "compressed"
    widths = {s.weights.num_bits: s for s in parsed.config_groups.values()}
    assert sorted(widths) == list(INTEGER_CODE_BITS)
    for scheme in widths.values():
        assert scheme.weights.group_size == 64 and not scheme.weights.symmetric
        assert scheme.weights.strategy == "group" and scheme.format == "pack-quantized"
    assert "model.embed_tokens" in parsed.ignore and "lm_head" in parsed.ignore
    assert "model.layers.1.mlp.gate" in parsed.ignore and "model.layers.1.mlp.experts.2.up_proj" in parsed.ignore
    targets = [t for s in widths.values() for t in s.targets]
    assert all(t.startswith("re:^") and t.endswith("$") for t in targets)
    assert not any("experts.2." in t and ".layers.1." in t for t in targets)


@pytest.mark.parametrize("bits", INTEGER_CODE_BITS)
def test_int32_packing_equals_compressed_tensors(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 77), dtype=torch.uint8)  # 77: rows end mid-word at every width
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    zeros = codes[:, :9]
    ours_zp = pack_int32(zeros.t().contiguous(), bits).t()
    theirs_zp = pack_to_int32((zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=0)
    assert torch.equal(ours_zp, theirs_zp)


def test_refuses_in_features_the_group_size_does_not_divide(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])  # dense MLP down_proj has 96 in-features
    settings = QuantSettings(group_size=64)
    model_map = checkpoint.model_map("layer")
    recipe = Recipe(ModelRef("tiny", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    settings, {g.name: 4 for g in model_map.select()})
    ensure_variants(checkpoint, model_map, [settings.config(4)], tmp_path / "work")
    recipe.save(tmp_path / "r.yaml")
    code = main(["compile", str(tmp_path / "r.yaml"), "--model", str(checkpoint.path), "--work",
                 str(tmp_path / "work"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")])
    err = capsys.readouterr().err
    assert code == 2 and "down_proj.weight has 96 input features" in err and "group size 64" in err
    assert not (tmp_path / "ct").exists()


def test_cli_writes_compressed_tensors_and_flags_vllm_fusions(wide_model: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(wide_model)
    settings = QuantSettings()
    recipe = all_widths_recipe(checkpoint, settings)  # experts of one layer at different widths
    ensure_variants(checkpoint, checkpoint.model_map("expert"), [settings.config(b) for b in INTEGER_CODE_BITS],
                    tmp_path / "work")
    recipe.save(tmp_path / "r.yaml")
    assert main(["compile", str(tmp_path / "r.yaml"), "--model", str(wide_model), "--work", str(tmp_path / "work"),
                 "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    report = json.loads((tmp_path / "ct" / "mixprec_compile.json").read_text())
    assert report["format"] == "compressed-tensors"
    assert "model.layers.1.mlp.experts" in report["vllm_fusion_conflicts"]
    assert 0 < report["negative_scales"] < report["scales"]  # signed RTN scales are written as they are
    assert (tmp_path / "ct" / "tokenizer.json").exists() == (wide_model / "tokenizer.json").exists()
    assert main(["eval", str(tmp_path / "ct"), "--reference", str(wide_model)]) == 2  # refused up front
    same = {name: 4 for name in recipe.groups}
    assert vllm_fusion_conflicts(checkpoint.model_map("expert"), {}) == []
    assert not vllm_fusion_conflicts(checkpoint.model_map("expert"),
                                     {ref.key.removesuffix(".weight"): b for n, b in same.items()
                                      for ref in checkpoint.model_map("expert").group(n).weights})


def test_every_registered_format_has_a_writer() -> None:
    from mixprec.checkpoint.registry import COMPILED_FORMATS, compiled_format

    assert compiled_format("compressed-tensors").writer() is compile_ctensors
    assert all(callable(fmt.writer()) for fmt in COMPILED_FORMATS.values())
    with pytest.raises(CompileError, match="unknown compiled format 'nope'"):
        compiled_format("nope")


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family_round_trips_through_compressed_tensors(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                             model_type: str) -> None:
    """Family contract: mixed widths at g32 (groups with in-features 32 does not divide stay unquantized,
    e.g. DeepSeek's kv_b_proj over a 16-wide latent), read back by compressed-tensors exactly."""
    checkpoint = Checkpoint.open(tiny_model_dirs[model_type])
    model_map = checkpoint.model_map("layer")
    widths = {GroupKind.ATTENTION: 6, GroupKind.ROUTED_EXPERTS: 3, GroupKind.SHARED_EXPERTS: 5, GroupKind.DENSE_MLP: 4}
    groups = {g.name: widths[g.kind] if all(r.shape[1] % 32 == 0 for r in g.weights) else None
              for g in model_map.select()}
    assert sum(b is not None for b in groups.values()) >= len(groups) - 2
    recipe = Recipe(ModelRef("tiny", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    QuantSettings(group_size=32), groups)
    assert_ct_rebuilds_mixprec_load(checkpoint, recipe, tmp_path, CompileConfig(max_shard_bytes=30_000))
