"""Variants stage and the inspect/quantize CLI on every family's tiny model; bad input leaves no partial files.

Run: .venv/bin/python -m pytest -q tests/test_variants.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mixprec.cli import main
from mixprec.core.errors import FingerprintMismatchError, ModelLoadError
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantConfig
from mixprec.quant.variants import Variant, apply_group, ensure_variants
from tests.tiny_models import TINY_CONFIGS


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_cli_inspect_and_quantize_every_family(model_type: str, tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tiny_model_dirs[model_type])
    assert main(["inspect", path, "--granularity", "fine"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.attn.q" in out and "lm_head" in out
    rtn = ["--options", "rtn-g64", "rtn-g32", "rtn-g128"]  # the data-free default (no tokenizer to calibrate GPTQ)
    assert main(["quantize", path, "--bits", "2", "3", "4", "5", "6", "8", "--work", str(tmp_path), *rtn]) == 0
    folders = sorted(p.name for p in (tmp_path / "variants").iterdir())
    assert folders == sorted(f"rtn-b{b}-g{g}-sym" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))
    g64 = [f"rtn-b{b}-g64-sym" for b in (2, 3, 4, 5, 6, 8)]
    bpws = [json.loads((tmp_path / "variants" / f / "manifest.json").read_text())["totals"]["bpw"] for f in g64]
    assert bpws == sorted(bpws) and bpws[0] >= 2.25


def test_manifest_bits_match_the_stored_codes(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    model_map = checkpoint.model_map()
    (variant,) = ensure_variants(checkpoint, model_map, [QuantConfig(bits=3)], tmp_path)
    for group in model_map.select():
        stored = sum(variant.quantized(ref).storage_bits() for ref in group.weights)
        assert variant.storage_bits(group) == stored == variant.manifest.groups[group.name].storage_bits
    assert variant.manifest.model.fingerprint == checkpoint.fingerprint


def test_apply_group_puts_dequantized_weights_into_fused_experts(tiny_model_dirs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    model_map = checkpoint.model_map()
    (variant,) = ensure_variants(checkpoint, model_map, [QuantConfig(bits=2)], tmp_path)
    model = load_model(checkpoint)
    params = dict(model.named_parameters())
    before = params["model.layers.1.mlp.experts.gate_up_proj"].detach().clone()
    group = model_map.group("layers.1.experts")
    apply_group(params, group, variant)
    after = params["model.layers.1.mlp.experts.gate_up_proj"]
    assert not torch.equal(before, after)
    up = next(ref for ref in group.weights if ref.key == "model.layers.1.mlp.experts.3.up_proj.weight")
    assert torch.equal(after[3, 32:], variant.dequantized(up))
    assert torch.equal(params["model.layers.1.self_attn.q_proj.weight"],
                       load_model(checkpoint).get_parameter("model.layers.1.self_attn.q_proj.weight"))


def test_rerun_reuses_finished_variants_and_rebuilds_corrupt_ones(tiny_model_dirs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["llama"])
    model_map = checkpoint.model_map()
    configs = [QuantConfig(bits=2), QuantConfig(bits=4)]
    first = ensure_variants(checkpoint, model_map, configs, tmp_path)
    stamps = [(v.path / "quantized.safetensors").stat().st_mtime_ns for v in first]
    again = ensure_variants(checkpoint, model_map, configs, tmp_path)
    assert [(v.path / "quantized.safetensors").stat().st_mtime_ns for v in again] == stamps
    corrupt = first[1].path / "quantized.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    rebuilt = ensure_variants(checkpoint, model_map, configs, tmp_path)
    rebuilt[1].verify()
    assert (rebuilt[0].path / "quantized.safetensors").stat().st_mtime_ns == stamps[0]


def test_other_models_variants_are_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    llama = Checkpoint.open(tiny_model_dirs["llama"])
    (variant,) = ensure_variants(llama, llama.model_map(), [QuantConfig(bits=4)], tmp_path)
    other = Checkpoint.open(tiny_model_dirs["qwen3"])
    with pytest.raises(FingerprintMismatchError, match="another model"):
        Variant.open(variant.path, other.fingerprint)


def test_failure_mid_variant_leaves_no_partial_folder(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A tensor that cannot be read aborts the variant; nothing half-written remains in the work folder."""
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    start, stop = header["model.layers.1.mlp.down_proj.weight"]["data_offsets"]
    del data[8 + header_len + start : 8 + header_len + stop]  # file now shorter than its header says
    (broken / "model.safetensors").write_bytes(bytes(data))
    work = tmp_path / "work"
    code = main(["quantize", str(broken), "--bits", "4", "--work", str(work)])
    assert code == 2
    leftovers = list((work / "variants").iterdir()) if (work / "variants").exists() else []
    assert leftovers == []


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{missing}", "--bits", "4"], "does not exist"),
    (["quantize", "{llama}", "--bits", "9"], "bits=9 is out of range"),
    (["inspect", "{missing}"], "does not exist"),
])
def test_cli_bad_input_gives_clear_error(argv: list[str], message: str, tiny_model_dirs: dict[str, Path],
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(missing=tmp_path / "missing", llama=tiny_model_dirs["llama"]) for a in argv]
    assert main(argv + (["--work", str(tmp_path / "w")] if argv[0] == "quantize" else [])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_read_of_missing_key_names_it(tiny_model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="no tensor named 'nope'"):
        Checkpoint.open(tiny_model_dirs["llama"]).read("nope")
