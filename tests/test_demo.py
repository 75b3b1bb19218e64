"""The end-to-end demo on a tiny Qwen2-MoE: every stage runs and the summary is consistent.

Run: .venv/bin/python -m pytest -q tests/test_demo.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixprec.cli import main
from mixprec.cli.demo import DemoConfig, run_demo
from mixprec.core.errors import MixprecError
from tests.measure_helpers import model_with_splits


@pytest.fixture(scope="module")
def demo_run(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    model = model_with_splits(tiny_model_dirs["qwen2_moe"], root / "model")
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
    assert (demo_run / "measure" / "drop-fine" / "table.csv").exists()
    # the searched widths at g64, plus the nearest uniform quant of each budget (any group size, e.g. 3-bit g128)
    searched = {f"rtn-b{b}-g64-sym" for b in (2, 3, 4, 8)}
    uniform = [row["comparison"]["uniform"]["solver"].split("-") for row in summary["budgets"]]
    assert all(label[0] == "uniform" and label[1].endswith("b") for label in uniform), uniform
    uniform += [row["comparison"][name]["solver"].split("-") for row in summary["budgets"]
                for name in row["comparison"] if name.startswith("uniform-fit-g")]  # the largest that fits, per size
    nearest = {f"rtn-b{label[1][:-1]}-{label[2]}-sym" for label in uniform}
    assert {p.name for p in (demo_run / "variants").iterdir()} == searched | nearest


def test_rerunning_the_demo_reuses_finished_work(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = demo_run / "measure" / "drop-fine" / "table.csv"
    stamp = table.stat().st_mtime_ns
    variants = {p.name: (p / "quantized.safetensors").stat().st_mtime_ns for p in (demo_run / "variants").iterdir()}
    model = demo_run.parent / "model"
    argv = ["demo", str(model), "--work", str(demo_run), "--budgets", "3.0", "--trials", "3", "--bits", "2", "3",
            "4", "8", "--measure-windows", "6", "--eval-windows", "8", "--seq-len", "64", "--device", "cpu",
            "--no-report"]
    assert main(argv) == 0
    assert "budget" in capsys.readouterr().out
    assert {p.name: (p / "quantized.safetensors").stat().st_mtime_ns
            for p in (demo_run / "variants").iterdir()} == variants
    assert table.stat().st_mtime_ns >= stamp  # rewritten from stored results, not re-measured


@pytest.mark.parametrize("kwargs", [dict(budgets=()), dict(budgets=(-1.0,)), dict(trials=0),
                                    dict(granularity="block")])
def test_bad_demo_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises((MixprecError, ValueError)):
        DemoConfig(**kwargs)
