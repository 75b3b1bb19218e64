"""Helpers for the measurement tests: a tiny model folder with token splits, and small configs.

Kept out of conftest.py so that spawned worker processes can import them by module name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixprec.measure.config import MeasureConfig
from mixprec.measure.engine.core import EngineConfig

__all__ = ["model_with_splits", "small_config", "work_with_variants", "run_worker_after_barrier"]


def model_with_splits(source: Path, target: Path, seed: int = 0) -> Path:
    """Copy a saved tiny model and add `calibration`/`evaluation` token splits like the bundled model's."""
    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    for split in ("calibration", "evaluation"):
        tokens = torch.randint(3, 160, (3000,), generator=generator, dtype=torch.int32)
        save_file({"tokens": tokens}, target / f"{split}.safetensors")
    return target


def work_with_variants(seed_work: Path, target: Path) -> Path:
    """A fresh work folder holding a copy of `seed_work`'s variants, so a test does not quantize again."""
    shutil.copytree(seed_work / "variants", target / "variants")
    return target


def small_config(model: Path, work: Path, **overrides: object) -> MeasureConfig:
    """A measurement that runs in about a second on the tiny Qwen2-MoE."""
    settings: dict[str, object] = dict(work=work, model=str(model), bits=(2, 4, 8), granularity="fine",
                                       num_windows=6, seq_len=24, device="cpu", batch_jobs=3,
                                       engine=EngineConfig(batch_windows=3, max_batch_windows=9))
    settings.update(overrides)
    return MeasureConfig(**settings)  # type: ignore[arg-type]


def run_worker_after_barrier(config: MeasureConfig, barrier: object) -> None:
    """Spawned-process target: prepare, wait until every worker is ready, then measure."""
    from mixprec.measure.run import Worker

    torch.set_num_threads(1)
    worker = Worker(config)
    worker._prepare_engine()
    barrier.wait()  # type: ignore[attr-defined]
    worker.run()
