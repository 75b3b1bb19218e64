"""Model map: every family's groups cover each weight once, and fused params <-> checkpoint keys round-trip.

Run: .venv/bin/python -m pytest -q tests/test_modelmap.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mixprec.core.errors import ModelLoadError, UnsupportedArchitectureError
from mixprec.model.arch import GroupKind, supported_model_types
from mixprec.model.loading import Checkpoint, load_model
from mixprec.model.modelmap import Granularity
from tests.tiny_models import TINY_CONFIGS, save_tiny_model

FAMILIES = sorted(TINY_CONFIGS)


def _disk_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_params_and_checkpoint_keys_round_trip(model_type: str, tiny_model_dirs: dict[str, Path]) -> None:
    """Each ref's in-memory slice equals its on-disk tensor, and writing disk tensors back rebuilds the params."""
    path = tiny_model_dirs[model_type]
    checkpoint = Checkpoint.open(path)
    model = load_model(checkpoint)
    params = dict(model.named_parameters())
    disk = _disk_tensors(path)
    model_map = checkpoint.model_map(Granularity.EXPERT)
    rebuilt = {name: torch.full_like(p, float("nan")) for name, p in params.items()}
    for group in model_map.groups:
        for ref in group.weights:
            assert torch.equal(ref.slice_memory(params[ref.param]), ref.slice_disk(disk[ref.key])), ref
            ref.slice_memory(rebuilt[ref.param]).copy_(ref.slice_disk(disk[ref.key]))
    for name in {ref.param for g in model_map.groups for ref in g.weights}:
        assert torch.equal(rebuilt[name], params[name]), f"{name} not fully covered by refs"


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("granularity", list(Granularity))
def test_groups_partition_the_weights(model_type: str, granularity: Granularity,
                                      tiny_model_dirs: dict[str, Path]) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs[model_type])
    model_map = checkpoint.model_map(granularity)
    units = [ref.unit for g in model_map.groups for ref in g.weights]
    assert len(units) == len(set(units)), "a matrix belongs to two groups"
    shapes = checkpoint.param_shapes()
    weight_params = {n for n, s in shapes.items() if len(s) >= 2}
    covered = {ref.param for g in model_map.groups for ref in g.weights}
    assert covered == weight_params
    total = sum(int(torch.Size(shapes[n]).numel()) for n in weight_params)
    assert sum(g.num_params for g in model_map.groups) == total
    assert len(model_map.names()) == len(set(model_map.names()))


def test_expected_kinds_per_family(tiny_model_dirs: dict[str, Path]) -> None:
    kinds = {mt: {g.kind for g in Checkpoint.open(p).model_map().groups} for mt, p in tiny_model_dirs.items()}
    moe_with_shared = {"qwen2_moe", "deepseek_v3", "glm4_moe"}
    for model_type, found in kinds.items():
        assert {GroupKind.ATTENTION, GroupKind.EMBEDDING, GroupKind.LM_HEAD} <= found
        assert (GroupKind.SHARED_EXPERTS in found) == (model_type in moe_with_shared), model_type
        assert (GroupKind.ROUTED_EXPERTS in found) == (model_type not in {"llama", "qwen3"}), model_type
    assert GroupKind.DENSE_MLP in kinds["deepseek_v3"] and GroupKind.DENSE_MLP in kinds["qwen2_moe"]


def test_mixtral_checkpoint_names(tiny_model_dirs: dict[str, Path]) -> None:
    model_map = Checkpoint.open(tiny_model_dirs["mixtral"]).model_map(Granularity.FINE)
    gate_up = model_map.group("layers.1.experts.gate_up")
    assert gate_up.keys[:2] == ("model.layers.1.block_sparse_moe.experts.0.w1.weight",
                                "model.layers.1.block_sparse_moe.experts.0.w3.weight")
    assert model_map.group("layers.1.router").keys == ("model.layers.1.block_sparse_moe.gate.weight",)


def test_fused_checkpoint_on_disk_is_understood(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_model_dirs["qwen3_moe"])
    model.save_pretrained(tmp_path, save_original_format=False)
    checkpoint = Checkpoint.open(tmp_path)
    assert "model.layers.0.mlp.experts.gate_up_proj" in checkpoint.key_to_file
    group = checkpoint.model_map(Granularity.EXPERT).group("layers.0.experts.1")
    params = dict(model.named_parameters())
    for ref in group.weights:
        assert ref.fused_on_disk
        assert torch.equal(ref.slice_disk(checkpoint.read(ref.key)), ref.slice_memory(params[ref.param]))


def test_unknown_group_names_suggest_nearest(tiny_model_dirs: dict[str, Path]) -> None:
    model_map = Checkpoint.open(tiny_model_dirs["qwen2_moe"]).model_map()
    with pytest.raises(Exception, match="layers.1.experts"):
        model_map.group("layers.1.expert")


def _write_config(path: Path, **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_not_a_causal_lm(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        Checkpoint.open(_write_config(tmp_path / "vit", model_type="vit"))


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        Checkpoint.open(_write_config(tmp_path / "gpt2", model_type="gpt2"))
    message = str(info.value)
    assert all(t in message for t in supported_model_types()) and "FAMILIES" in message


def test_corrupt_safetensors(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    source = tiny_model_dirs["llama"]
    (broken / "config.json").write_bytes((source / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Checkpoint.open(broken)


def test_truncated_safetensors(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    broken = tmp_path / "truncated"
    broken.mkdir()
    source = tiny_model_dirs["llama"]
    (broken / "config.json").write_bytes((source / "config.json").read_bytes())
    data = (source / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Checkpoint.open(broken)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tiny_family_runs_a_forward_pass(model_type: str, tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_model_dirs[model_type])
    with torch.no_grad():
        logits = model(torch.arange(3, 19).view(2, 8)).logits
    assert logits.shape == (2, 8, 160) and torch.isfinite(logits).all()


def test_zero_width_shared_expert_forms_no_group(tmp_path: Path) -> None:
    """Qwen2-MoE with `shared_expert_intermediate_size: 0` (no shared expert) lists no empty shared groups."""
    path = save_tiny_model("qwen2_moe", tmp_path / "noshared", shared_expert_intermediate_size=0)
    checkpoint = Checkpoint.open(path)
    for granularity in (Granularity.FINE, Granularity.EXPERT_FINE):
        model_map = checkpoint.model_map(granularity)
        assert not [g.name for g in model_map.groups if g.kind is GroupKind.SHARED_EXPERTS]
        assert all(g.num_params > 0 for g in model_map.groups)
        assert any(g.kind is GroupKind.ROUTED_EXPERTS for g in model_map.groups)
