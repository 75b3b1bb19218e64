"""A small real work folder for the report, dashboard and notebook tests.

The tiny random Qwen2-MoE (`tests.tiny_models`) gets token splits, then the real stages run
in-process exactly as the CLI runs them: variants at 2/3/4 bits, a drop-mode measurement at fine
granularity, and a search at two budgets whose recipes land in WORK/recipes/ and whose studies land
in WORK/studies/ (SQLite, with recipe YAML artifacts). The bundled model is not used: quantizing and
measuring it at six widths takes minutes, the tiny model takes seconds and exercises the same files.

`shared_work_folder` builds the folder once per pytest session (under the session's base temp dir)
so the three test files that read it do not each pay for it.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

import pytest
import torch

from mixprec.formats.recipe import Budget
from mixprec.measure.config import MeasureConfig
from mixprec.measure.engine.core import EngineConfig
from mixprec.search.inputs import StageConfig, measure_missing
from mixprec.search.pipeline import run_stage
from mixprec.search.study import SearchConfig, quiet_optuna
from tests.measure_helpers import model_with_splits
from tests.tiny_models import save_tiny_model

__all__ = ["BUDGETS", "BITS", "build_work_folder", "shared_work_folder"]

BUDGETS = (2.5, 3.0)
BITS = (2, 3, 4)


def _stage_config(model: Path, work: Path, budget: float) -> StageConfig:
    measure = MeasureConfig(work=work, model=str(model), bits=BITS, granularity="fine", num_windows=4, seq_len=32,
                            device="cpu", engine=EngineConfig(batch_windows=4, max_batch_windows=8))
    search = SearchConfig(trials=6, study_name=f"tiny-{budget:g}bpw", studies_dir=work / "studies")
    return StageConfig(work=work, budget=Budget(bpw=budget), model=str(model), granularity="fine", measure=measure,
                       search=search, eval_windows=4, eval_seq_len=32, device="cpu")


def build_work_folder(tiny_model: Path, root: Path) -> Path:
    """Model copy with splits in `root/tiny-moe`, work folder in `root/work` (returned)."""
    model = model_with_splits(tiny_model, root / "tiny-moe")
    work = root / "work"
    quiet_optuna()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and kinder to a shared machine
    try:
        for budget in BUDGETS:
            config = _stage_config(model, work, budget)
            measure_missing(config)
            result = run_stage(config)
            result.recipe.save(work / "recipes" / f"tiny-{budget:g}bpw.yaml")
    finally:
        torch.set_num_threads(threads)
    return work


def shared_work_folder(factory: pytest.TempPathFactory) -> Path:
    """The session's work folder, built by the first test that asks (a file lock guards xdist workers).

    Only the Qwen2-MoE tiny model is saved (not every family, as the `tiny_model_dirs` fixture does)."""
    root = factory.getbasetemp() / "report-work"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "work" / ".complete"
        if not done.exists():
            shutil.rmtree(root / "work", ignore_errors=True)
            for leftover in ("tiny-moe", "source"):
                shutil.rmtree(root / leftover, ignore_errors=True)
            source = save_tiny_model("qwen2_moe", root / "source")
            build_work_folder(source, root)
            done.touch()
    return root / "work"
