"""Split mode: per-expert rows from the fine table, router-weighted importance, and the search over them.

Run: .venv/bin/python -m pytest tests/test_split.py -q
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixprec.cli import main
from mixprec.core.errors import MixprecError
from mixprec.formats.recipe import Recipe
from mixprec.measure.config import MeasureConfig
from mixprec.measure.inputs import measure_variants
from mixprec.measure.run import run_measure
from mixprec.measure.split import expert_shares, fine_config
from mixprec.measure.table import load_measurement
from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant.hessians import decoder_of
from mixprec.quant.importance import ExpertImportance, collect_expert_importance
from tests.measure_helpers import model_with_splits, small_config


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("split") / "tiny")


@pytest.fixture(scope="module")
def split_table(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = small_config(model_dir, tmp_path_factory.mktemp("work"), mode="split", granularity="expert")
    return config, load_measurement(run_measure(config)), load_measurement(fine_config(config).folder)


def test_split_rows_add_up_to_the_measured_fine_loss(split_table) -> None:
    config, split, fine = split_table
    table = split.table
    assert config.folder.name == "split-expert" and (table["mode"] == "split").all()
    experts = table[table["kind"] == GroupKind.ROUTED_EXPERTS.value]
    assert sorted(experts["group"].unique()) == [f"layers.1.experts.{e}" for e in range(4)]  # layer 0 is dense
    for bits in (2, 4, 8):
        measured = fine.table[(fine.table["bits"] == bits) & (fine.table["kind"] == "routed_experts")]["kl_mean"]
        assert experts[experts["bits"] == bits]["kl_mean"].sum() == pytest.approx(measured.sum(), rel=1e-9)
    assert (experts["kl_mean"] > 0).all() and (experts["kl_se"] > 0).all()
    others = table[table["kind"] != GroupKind.ROUTED_EXPERTS.value].set_index(["group", "bits"])["kl_mean"]
    measured = fine.table.set_index(["group", "bits"])["kl_mean"]
    assert others.to_dict() == {k: measured[k] for k in others.index}, "non-expert rows are the fine table's"
    checkpoint = Checkpoint.open(config.model)
    group = checkpoint.model_map("expert").group("layers.1.experts.2")
    row = experts[(experts["group"] == group.name) & (experts["bits"] == 4)].iloc[0]
    assert row["params"] == group.num_params and row["bpw"] == row["storage_bits"] / group.num_params
    assert split.summary.settings.mode == "split" and split.summary.counts["split_from"] == str(fine.folder)


def test_importance_is_the_router_weighted_second_moment(model_dir: Path) -> None:
    """Σ g² x² per expert, checked against the experts module's own inputs captured by a plain hook."""
    checkpoint = Checkpoint.open(model_dir)
    model = load_model(checkpoint)
    tokens = torch.randint(3, 160, (3, 16), generator=torch.Generator().manual_seed(1))
    experts = decoder_of(model).layers[1].mlp.experts
    seen: list[tuple[torch.Tensor, ...]] = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(tuple(a.detach() for a in args)))
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    (x, index, weights), = seen
    found, = list(collect_expert_importance(model, checkpoint.model_map("fine"), tokens))
    assert found.layer == 1 and sum(found.tokens) == tokens.numel() * 2  # top-2 routing
    for e in range(4):
        g2 = (weights * (index == e)).sum(-1).square()
        expected = (g2[:, None] * x.square()).sum(0)
        assert torch.allclose(found.gate_up[e].float(), expected, rtol=1e-4, atol=1e-6)


def test_an_expert_without_weight_gets_no_share(split_table) -> None:
    config, _, _ = split_table
    checkpoint = Checkpoint.open(config.model)
    variants = measure_variants(config, checkpoint)
    fine_map, expert_map = checkpoint.model_map("fine"), checkpoint.model_map("expert")
    hidden, inner = 64, 32
    ones = ExpertImportance(1, "model.layers.1.mlp.experts", torch.ones(4, hidden, dtype=torch.float64),
                            torch.ones(4, inner, dtype=torch.float64), [10, 10, 10, 10])
    ones.gate_up[3] = 0.0
    ones.down[3] = 0.0
    shares = expert_shares(fine_map, expert_map, checkpoint, variants, [ones])
    for fine_group, row in shares.items():
        for bits in variants:
            assert math.isclose(sum(r[bits] for r in row.values()), 1.0)
            assert row["layers.1.experts.3"][bits] == 0.0, fine_group


def test_split_mode_refusals(model_dir: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MixprecError, match="--granularity expert"):
        MeasureConfig(work=tmp_path, mode="split", granularity="fine")
    dense = model_with_splits(tiny_model_dirs["llama"], tmp_path / "dense")
    code = main(["measure", str(dense), "--work", str(tmp_path / "w"), "--mode", "split", "--granularity", "expert",
                 "--bits", "2", "4", "--windows", "2", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "no routed experts" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w" / "measure").exists(), "refused before the fine table is measured"


@pytest.mark.slow
def test_search_reads_the_split_table(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`search --granularity expert --mode split` measures the fine table, splits it and ships per-expert widths."""
    out = tmp_path / "r.yaml"
    code = main(["search", str(model_dir), "--work", str(tmp_path / "work"), "--bits", "2", "4", "8",
                 "--windows", "4", "--seq-len", "24", "--eval-windows", "4", "--studies-dir", str(tmp_path / "s"),
                 "--granularity", "expert", "--mode", "split", "--budget", "4.5", "--trials", "4", "--options",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "work" / "measure" / "drop-fine" / "table.csv").exists()
    assert (tmp_path / "work" / "measure" / "split-expert" / "table.csv").exists()
    studies = [p.name for p in (tmp_path / "s").glob("*.db")]
    assert studies == ["tiny-expert-4.5bpw-s0-split.db"], studies
    recipe = Recipe.load(out)
    checkpoint = Checkpoint.open(model_dir)
    recipe.check_model(checkpoint.model_map("expert"), checkpoint.fingerprint)
    assert {f"layers.1.experts.{e}" for e in range(4)} <= set(recipe.groups)
    assert recipe.achieved["bpw"] <= 4.5


def test_exl3_export_warns_about_per_expert_widths(split_table, caplog: pytest.LogCaptureFixture) -> None:
    """exllamav3's fused MoE path needs one width per layer: a per-expert recipe says so when exported."""
    from mixprec.formats.exl3 import recipe_to_exl3

    config, _, _ = split_table
    expert_map = Checkpoint.open(config.model).model_map("expert")
    groups = {g.name: 4 for g in expert_map.select()}
    recipe_to_exl3(groups, expert_map, {4: "/q/4"}, base_bits=None)
    assert "different widths" not in caplog.text
    groups["layers.1.experts.2"] = 8
    recipe_to_exl3(groups, expert_map, {4: "/q/4", 8: "/q/8"}, base_bits=None)
    assert "layers [1] give their routed experts different widths" in caplog.text


def test_split_streamed_equals_whole(split_table, tmp_path: Path) -> None:
    """With one layer's weights resident at a time (a model larger than memory) the split rows are the same."""
    import shutil

    config, split, _ = split_table
    work = tmp_path / "work"
    shutil.copytree(config.work / "variants", work / "variants")
    shutil.copytree(fine_config(config).folder, fine_config(replace(config, work=work)).folder)
    streamed = load_measurement(run_measure(replace(config, work=work, streaming="on")))
    columns = ["group", "bits", "kl_mean", "kl_se", "storage_bits"]
    assert streamed.table[columns].equals(split.table[columns])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "olmoe", "glm4_moe"])
def test_importance_in_every_moe_family(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    """Each family's experts module is called with (hidden, top-k index, top-k weights): every token is counted
    top-k times and the router-weighted moments are finite and positive wherever an expert got tokens."""
    checkpoint = Checkpoint.open(tiny_model_dirs[family])
    model = load_model(checkpoint)
    tokens = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(2))
    found = list(collect_expert_importance(model, checkpoint.model_map("fine"), tokens))
    moe_layers = {g.layer for g in checkpoint.model_map("fine").select([GroupKind.ROUTED_EXPERTS])}
    assert {imp.layer for imp in found} == moe_layers
    for imp in found:
        assert sum(imp.tokens) == tokens.numel() * 2, (family, imp.tokens)  # top-2 in every tiny config
        for e, count in enumerate(imp.tokens):
            assert bool((imp.gate_up[e] > 0).any()) == (count > 0) and bool((imp.down[e] > 0).any()) == (count > 0)
            assert torch.isfinite(imp.gate_up[e]).all() and torch.isfinite(imp.down[e]).all()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_split_table_in_other_layouts(family: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """No shared experts (Mixtral), MLA with a shared expert and a dense first layer (DeepSeek-V3): the split
    rows cover every routed expert and add up to the measured fine loss."""
    model = model_with_splits(tiny_model_dirs[family], tmp_path / "model")
    config = small_config(model, tmp_path / "work", mode="split", granularity="expert", bits=(2, 4))
    split = load_measurement(run_measure(config)).table
    fine = load_measurement(fine_config(config).folder).table
    expert_groups = Checkpoint.open(model).model_map("expert").select([GroupKind.ROUTED_EXPERTS])
    assert set(split[split["kind"] == "routed_experts"]["group"]) == {g.name for g in expert_groups}
    for bits in (2, 4):
        part = split[(split["bits"] == bits) & (split["kind"] == "routed_experts")]["kl_mean"].sum()
        whole = fine[(fine["bits"] == bits) & (fine["kind"] == "routed_experts")]["kl_mean"].sum()
        assert part == pytest.approx(whole, rel=1e-9)


def test_expert_fine_groups_and_split(split_table, tmp_path: Path) -> None:
    """`expert-fine`: gate+up and down of each expert apart; its split rows add up per projection."""
    import shutil

    config, _, measured = split_table
    fine = measured.table
    expert_fine = Checkpoint.open(config.model).model_map("expert-fine")
    names = [g.name for g in expert_fine.select([GroupKind.ROUTED_EXPERTS])]
    assert names == [f"layers.1.experts.{e}.{p}" for e in range(4) for p in ("gate_up", "down")]
    work = tmp_path / "work"
    shutil.copytree(config.work / "variants", work / "variants")
    shutil.copytree(fine_config(config).folder, fine_config(replace(config, work=work)).folder)
    split = load_measurement(run_measure(replace(config, work=work, granularity="expert-fine"))).table
    assert split_table[0].folder.name == "split-expert" and (work / "measure" / "split-expert-fine").is_dir()
    for projection in ("gate_up", "down"):
        part = split[split["group"].str.endswith(f".{projection}") & (split["kind"] == "routed_experts")]
        whole = fine[(fine["group"] == f"layers.1.experts.{projection}")]
        for bits in (2, 4, 8):
            assert part[part["bits"] == bits]["kl_mean"].sum() == pytest.approx(
                float(whole[whole["bits"] == bits]["kl_mean"].iloc[0]), rel=1e-9)


def test_importance_is_computed_once_and_read_back_exactly(split_table, tmp_path: Path) -> None:
    """Every family's split table shares one forward pass: the importance file is reused, read back bitwise."""
    from mixprec.model.data import WindowConfig, load_windows
    from mixprec.quant.importance import load_importance

    config, _, _ = split_table
    saved, = (config.work / "measure").glob("importance-*.safetensors")
    checkpoint = Checkpoint.open(config.model)
    windows = load_windows(checkpoint.path, "calibration", WindowConfig(config.seq_len, config.num_windows))
    fresh = list(collect_expert_importance(load_model(checkpoint), checkpoint.model_map("fine"), windows.tokens,
                                           config.engine.batch_windows))
    loaded = load_importance(saved)
    assert [(i.layer, i.module, i.tokens) for i in loaded] == [(i.layer, i.module, i.tokens) for i in fresh]
    assert all(torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)
               for a, b in zip(loaded, fresh, strict=True))
    stamp = saved.stat().st_mtime_ns
    run_measure(replace(config, quant=replace(config.quant, group_size=32)))  # another family's split table
    assert saved.stat().st_mtime_ns == stamp, "the second family reused the importance"
    broken = tmp_path / "importance.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(MixprecError, match="delete it and re-run"):
        load_importance(broken)
