"""Several processes on one measurement: two workers split a table; kill -9 and a rerun completes it.

Run: .venv/bin/python -m pytest tests/test_measure_workers.py -q
(spawns Python processes; about 30-60 s on two busy cores)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixprec.measure.run import Worker, run_measure
from mixprec.measure.table import load_measurement
from tests.measure_helpers import model_with_splits, run_worker_after_barrier, small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("workers") / "tiny")


def test_two_worker_processes_split_one_table(model_dir: Path, tmp_path: Path) -> None:
    config = small_config(model_dir, tmp_path, batch_jobs=2)
    setup = Worker(config)  # quantizes and enqueues once, as `run_measure(workers=2)` does before spawning
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=run_worker_after_barrier, args=(config, barrier)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode == 0
    assert setup.store.counts() == {"COMPLETE": len(setup.jobs)}, "every job measured exactly once"
    table = load_measurement(setup.write()).table
    assert len(table) == len(setup.jobs) == 36
    assert not table.duplicated(["group", "bits"]).any()
    assert table["worker"].nunique() == 2, f"both workers should have measured jobs: {table['worker'].value_counts()}"


def _states(config) -> dict[str, int]:
    """Trial counts per state, read straight from the journal (cheap enough to poll)."""
    import optuna

    from mixprec.core.storage import open_storage
    from mixprec.measure.store import STUDY_NAME

    storage = open_storage(None, config.folder, create=False)  # create=True would repair (rewrite) the journal
    counts: dict[str, int] = {}
    for trial in optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def test_kill_9_then_rerun_completes_the_table(model_dir: Path, tmp_path: Path) -> None:
    """A worker killed mid-job leaves RUNNING trials; the next run on this host measures them again."""
    config = small_config(model_dir, tmp_path, granularity="expert", bits=(2, 3, 4, 5, 6, 8), num_windows=12,
                          batch_jobs=4)
    expected = len(Worker(config).jobs)  # quantize up front so the child spends its time measuring
    assert expected == 14 * 6  # fine groups, with routed experts split per expert
    command = [sys.executable, "-m", "mixprec", "measure", str(model_dir), "--work", str(tmp_path), "--bits",
               "2", "3", "4", "5", "6", "8", "--granularity", "expert", "--windows", "12", "--seq-len", "24",
               "--device", "cpu", "--batch-jobs", "4", "--batch-windows", "3"]
    child = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # frozen while the table is read, so a slow read costs it no progress
        assert child.poll() is None, "the worker finished before it could be killed; give it more jobs"
        child.send_signal(signal.SIGSTOP)
        # frozen while holding the journal's lock (a symlink beside it), it would block the read until Optuna
        # broke the lock, and then fail its own release: let it finish the append first
        if not os.path.lexists(config.folder / "journal.log.lock") and _states(config).get("COMPLETE", 0) >= 4:
            break
        child.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = _states(config)
    assert 4 <= before.get("COMPLETE", 0) < expected, before
    folder = run_measure(config)
    assert folder is not None
    table = load_measurement(folder).table
    assert len(table) == expected and not table.duplicated(["group", "bits"]).any()
    after = Worker(config).store.counts()
    assert after["COMPLETE"] == expected
    assert after.get("FAIL", 0) == before.get("RUNNING", 0), "exactly the killed worker's jobs were redone"
