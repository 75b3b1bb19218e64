"""kill -9 at several points of the quantize and compile stages, then rerun: the outputs equal an uninterrupted
run's and no temporary survives the rerun (issue 12). The measure stage's kill -9 test is in
tests/test_measure_workers.py, the search study's resume in tests/test_search.py.

Kill points: when the first temporary file or folder appears (mid-write), and when the first finished output
appears (between two writes). A child that finishes before the point is reached still counts: the rerun must
then reuse its output unchanged.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_crash_safety.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mixprec.cli import main
from mixprec.core.fileio import sha256_file
from mixprec.model.loading import Checkpoint
from tests.test_compile import FAST, make_recipe

pytestmark = pytest.mark.slow

BITS = ["2", "4", "8"]


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def _kill_at(argv: list[str], point: Callable[[], bool], timeout: float = 240) -> bool:
    """Run `mixprec ARGV` in a child and SIGKILL it once `point()` holds; True if it was killed mid-run."""
    child = subprocess.Popen([sys.executable, "-m", "mixprec", *argv], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while child.poll() is None and not point() and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    return killed


def _tensors(path: Path) -> dict[str, object]:
    """Tensor name -> bytes hash, plus the metadata as a dict. Note: not the file's sha256: safetensors writes
    the metadata map in a random order, so two identical saves can differ in their header bytes."""
    import hashlib

    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        found: dict[str, object] = {"__metadata__": handle.metadata()}
        for key in handle.keys():
            tensor = handle.get_tensor(key).contiguous()
            found[key] = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(tensor.view(-1).view(
                torch.uint8).numpy().tobytes()).hexdigest())
    return found


def _variant_state(work: Path) -> dict[str, object]:
    """Tensors and manifest (minus its timing and file hash) of every variant."""
    state: dict[str, object] = {}
    for manifest in sorted(work.glob("variants/*/manifest.json")):
        data = json.loads(manifest.read_text())
        for key in ("elapsed_s", "file_sha256"):
            data.pop(key, None)
        state[manifest.parent.name] = (_tensors(manifest.parent / "quantized.safetensors"), data)
    return state


def _compiled_state(out: Path) -> dict[str, object]:
    """Every shard's tensors, every other file's bytes, and the compile report minus timing and shard hashes."""
    state: dict[str, object] = {p.name: _tensors(p) if p.suffix == ".safetensors" else sha256_file(p)
                                for p in out.iterdir() if p.name != "mixprec_compile.json"}
    report = json.loads((out / "mixprec_compile.json").read_text())
    report.pop("elapsed_s", None)
    for shard in report["shards"].values():
        shard.pop("sha256", None)
    return {**state, "report": report}


def _points(root: Path, finished: str) -> dict[str, Callable[[], bool]]:
    return {"mid-write": lambda: bool(_temps(root)), "between writes": lambda: any(root.rglob(finished))}


@pytest.mark.parametrize("point", ["mid-write", "between writes"])
def test_quantize_killed_then_rerun_equals_uninterrupted(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                         point: str) -> None:
    model = str(tiny_model_dirs["qwen2_moe"])
    assert main(["quantize", model, "--bits", *BITS, "--work", str(tmp_path / "whole")]) == 0
    work = tmp_path / "killed"
    argv = ["quantize", model, "--bits", *BITS, "--work", str(work)]
    _kill_at(argv, _points(work, "manifest.json")[point])
    assert main(argv) == 0
    assert _variant_state(work) == _variant_state(tmp_path / "whole")
    assert _temps(tmp_path) == [], "the rerun removes what the killed run left"


@pytest.mark.parametrize("point", ["mid-write", "between writes"])
def test_compile_killed_then_rerun_equals_uninterrupted(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                        point: str) -> None:
    model = tiny_model_dirs["qwen2_moe"]
    recipe = make_recipe(Checkpoint.open(model), settings=FAST)
    recipe.save(tmp_path / "recipe.yaml")
    widths = sorted({str(b) for b in recipe.groups.values() if b is not None})
    assert main(["quantize", str(model), "--bits", *widths, "--work", str(tmp_path / "work")]) == 0
    argv = ["compile", str(tmp_path / "recipe.yaml"), "--model", str(model), "--work", str(tmp_path / "work"),
            "--max-shard-size", "30KB"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    points = {"mid-write": lambda: bool(_temps(tmp_path)),
              "between writes": lambda: len(list(tmp_path.glob(".out.*.tmp/model-*.safetensors"))) >= 2}
    _kill_at([*argv, "--out", str(tmp_path / "out")], points[point])
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert _compiled_state(tmp_path / "out") == _compiled_state(tmp_path / "whole")
    assert _temps(tmp_path) == []
