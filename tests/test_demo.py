"""The end-to-end demo on a tiny Qwen2-MoE: every stage runs and the summary is consistent.

The tiny model is in the bundled model's layout (every layer MoE with a shared expert, no top-k
renormalisation), the one llama.cpp's qwen2moe graph computes, so the demo's GGUF stage runs in llama.cpp.

Run: .venv/bin/python -m pytest -q tests/test_demo.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mixprec.checkpoint.ggufrun import llama_cpp_available
from mixprec.cli import main
from mixprec.cli.demo import DemoConfig, run_demo
from mixprec.core.errors import MixprecError
from mixprec.formats.recipe import ModelRef, Recipe
from mixprec.quant import QuantSettings
from tests.measure_helpers import model_with_splits
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    source = save_tiny_model("qwen2_moe", root / "source", mlp_only_layers=[], norm_topk_prob=False)
    model = model_with_splits(source, root / "model")
    work = root / "work"
    # a smaller width set keeps the test fast; the CLI path is exercised by the re-run test below
    config = DemoConfig(work=work, model=str(model), bits=(2, 3, 4, 8), budgets=(3.0, 4.5), trials=3,
                        measure_windows=6, eval_windows=8, seq_len=64, device="cpu", report=False)
    run_demo(config)
    return work


def test_demo_runs_every_stage_and_writes_its_outputs(demo_run: Path) -> None:
    summary = json.loads((demo_run / "demo_summary.json").read_text())
    assert [b["budget"] for b in summary["budgets"]] == [3.0, 4.5]
    assert set(summary["timings_s"]) >= {"quantize+measure", "budget 3", "budget 4.5", "total"}
    for row in summary["budgets"]:
        assert row["achieved_bpw"] <= row["budget"] + 1e-9
        assert Path(row["recipe"]).exists() and (Path(row["compiled"]) / "config.json").exists()
        assert abs(row["actual_bytes"] - row["predicted_bytes"]) <= 0.02 * row["predicted_bytes"]
        # the compiled checkpoint scores what the search measured for the same recipe on the same windows
        searched = row["comparison"]["mixprec"]["evaluation_kl"]
        assert row["compiled_kl"] == pytest.approx(searched, rel=1e-3, abs=1e-9)
        recipe = Recipe.load(row["recipe"])  # each group chose among the option families: labels, not widths
        assert recipe.uses_options and all(v is None or isinstance(v, str) for v in recipe.groups.values())
    assert (demo_run / "measure" / "drop-fine" / "table.csv").exists()
    # the demo's option families (each width at g64, g32, g128), plus the nearest uniform quant of each budget
    searched = {f"rtn-b{b}-g{g}-sym" for b in (2, 3, 4, 8) for g in (64, 32, 128)}
    uniform = [row["comparison"]["uniform"]["solver"].split("-") for row in summary["budgets"]]
    assert all(label[0] == "uniform" and label[1].endswith("b") for label in uniform), uniform
    uniform += [row["comparison"][name]["solver"].split("-") for row in summary["budgets"]
                for name in row["comparison"] if name.startswith("uniform-fit-g")]  # the largest that fits, per size
    nearest = {f"rtn-b{label[1][:-1]}-{label[2]}-sym" for label in uniform}
    made = {p.name for p in (demo_run / "variants").iterdir()}
    assert {name for name in made if not name.startswith("gguf-")} == searched | nearest


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed (MIXPREC_NO_GGUF=1)")
def test_demo_ends_with_a_gguf_that_llama_cpp_runs(demo_run: Path) -> None:
    """Each budget's recipe is written as a GGUF in its ggml types and scored by llama.cpp on the held-out windows."""
    from gguf import GGUFReader

    from mixprec.checkpoint.gguf import as_ggml_recipe, gguf_types
    from mixprec.model.loading import Checkpoint

    checkpoint = Checkpoint.open(demo_run.parent / "model")
    for row in json.loads((demo_run / "demo_summary.json").read_text())["budgets"]:
        assert "gguf_skipped" not in row, row.get("gguf_skipped")
        recipe = as_ggml_recipe(Recipe.load(row["recipe"]))
        expected = gguf_types(recipe, checkpoint.model_map(recipe.granularity))
        written = {t.name: t.tensor_type.name for t in GGUFReader(row["gguf"]).tensors}
        assert {name: written[name] for name in expected} == expected
        assert math.isfinite(row["gguf_kl"]) and 0 < row["gguf_kl"] and row["gguf_kl_se"] > 0
        # every group keeps at least its RTN width (ggml blocks cost more), so llama.cpp is not worse than the
        # compiled RTN checkpoint on the same windows beyond its own 8-bit activations
        assert row["gguf_kl"] < 1.5 * row["compiled_kl"], (row["gguf_kl"], row["compiled_kl"])
        assert row["gguf_bpw"] >= row["achieved_bpw"]


def test_rerunning_the_demo_reuses_finished_work(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = demo_run / "measure" / "drop-fine" / "table.csv"
    stamp = table.stat().st_mtime_ns
    variants = {p.name: (p / "quantized.safetensors").stat().st_mtime_ns for p in (demo_run / "variants").iterdir()}
    model = demo_run.parent / "model"
    argv = ["demo", str(model), "--work", str(demo_run), "--budgets", "3.0", "--trials", "3", "--bits", "2", "3",
            "4", "8", "--measure-windows", "6", "--eval-windows", "8", "--seq-len", "64", "--device", "cpu",
            "--no-report", "--no-gguf"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "budget" in out and "GGUF stage skipped: turned off (--no-gguf)" in out
    assert {p.name: (p / "quantized.safetensors").stat().st_mtime_ns
            for p in (demo_run / "variants").iterdir()} == variants
    assert table.stat().st_mtime_ns >= stamp  # rewritten from stored results, not re-measured


@pytest.mark.parametrize("kwargs", [dict(budgets=()), dict(budgets=(-1.0,)), dict(trials=0),
                                    dict(granularity="block"), dict(mode="split")])
def test_bad_demo_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises((MixprecError, ValueError)):
        DemoConfig(**kwargs)


def test_demo_with_a_width_per_expert(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--granularity expert --mode split`: the fine table is reused, split per expert, and every expert gets its
    own width in the compiled checkpoint, which scores what the search measured."""
    model = demo_run.parent / "model"
    argv = ["demo", str(model), "--work", str(demo_run), "--budgets", "3.0", "--trials", "3", "--bits", "2", "3",
            "4", "8", "--measure-windows", "6", "--eval-windows", "8", "--seq-len", "64", "--device", "cpu",
            "--no-report", "--granularity", "expert", "--mode", "split"]
    assert main(argv) == 0, capsys.readouterr().err
    row, = json.loads((demo_run / "demo_summary.json").read_text())["budgets"]
    recipe = Recipe.load(row["recipe"])
    assert recipe.granularity == "expert" and "layers.1.experts.3" in recipe.groups
    assert (demo_run / "measure" / "split-expert" / "table.csv").exists()
    assert row["compiled_kl"] == pytest.approx(row["comparison"]["mixprec"]["evaluation_kl"], rel=1e-3, abs=1e-9)
    if llama_cpp_available():  # GGUF holds one type per layer and projection: written only if the experts agree
        layers: dict[str, set[int | None]] = {}
        for name, bits in recipe.widths().items():
            if ".experts." in name:
                layers.setdefault(name.split(".")[1], set()).add(bits)
        assert ("gguf_kl" in row) == all(len(w) == 1 for w in layers.values()), row.get("gguf_skipped")
        assert "gguf_kl" in row or "one ggml type per expert tensor" in row["gguf_skipped"]


def test_gguf_stage_skips_a_recipe_whose_experts_differ(demo_run: Path) -> None:
    """llama.cpp holds one type per expert tensor: the stage says so before quantizing any ggml variant."""
    from mixprec.cli.demo import _gguf_stage
    from mixprec.model.loading import Checkpoint

    checkpoint = Checkpoint.open(demo_run.parent / "model")
    expert_map = checkpoint.model_map("expert")
    groups = {g.name: 4 for g in expert_map.select()}
    groups["layers.1.experts.2"] = 3
    recipe = Recipe(ModelRef("model", checkpoint.model_type, checkpoint.fingerprint), expert_map.granularity,
                    QuantSettings(), groups)
    before = {p.name for p in (demo_run / "variants").iterdir()}
    row = _gguf_stage(DemoConfig(work=demo_run, model=str(checkpoint.path)), checkpoint, recipe, 4.0)
    assert "one ggml type per expert tensor" in row["gguf_skipped"], row
    assert {p.name for p in (demo_run / "variants").iterdir()} == before, "no ggml variant was made for it"
