"""Scale-out on a real PostgreSQL server: two worker processes share one table; one is killed mid-job.

The server is started by the test (tests/pg_server.py, Debian's postgresql package installed by runs/setup.sh)
and reached through Optuna's RDB storage, the storage Optuna documents for workers on several machines.

Run: .venv/bin/python -m pytest tests/test_measure_postgres.py -q   (about 30-60 s on two busy cores)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixprec.measure.run import Worker
from mixprec.measure.table import load_measurement
from tests.measure_helpers import model_with_splits, small_config
from tests.pg_server import postgres_bin, postgres_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI") or shutil.which("apt-get"):
            pytest.fail("PostgreSQL server binaries not found; run runs/setup.sh (it installs Debian's postgresql)")
        pytest.skip("no PostgreSQL server binaries and no apt-get to install them")
    with postgres_server(bin_dir) as url:
        yield url


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("pg") / "tiny")


def _trials(url: str) -> list:
    import optuna

    from mixprec.measure.store import STUDY_NAME

    study = optuna.load_study(study_name=STUDY_NAME, storage=optuna.storages.get_storage(url))
    return study.get_trials(deepcopy=False)


def _held_by(url: str, pid: int) -> list:
    """RUNNING trials whose recorded owner is process `pid`."""
    return [t for t in _trials(url) if t.state.name == "RUNNING" and t.user_attrs.get("owner", {}).get("pid") == pid]


def _kill_mid_job(url: str, victim: subprocess.Popen, timeout: float = 240) -> int:
    """SIGKILL `victim` while it holds claimed jobs whose owner is written; returns how many it held.

    The victim is frozen (SIGSTOP) before its claims are read, so the count cannot change before the kill,
    and unfrozen to try again if it was caught between a claim and its owner record.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert victim.poll() is None, "the victim finished before it could be killed; give it more jobs"
        if _held_by(url, victim.pid):
            victim.send_signal(signal.SIGSTOP)
            held = _held_by(url, victim.pid)
            ownerless = [t for t in _trials(url) if t.state.name == "RUNNING" and "owner" not in t.user_attrs]
            if held and not ownerless:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                return len(held)
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the victim never held a job")


def test_two_workers_on_postgres_one_killed_table_complete(postgres_url: str, model_dir: Path,
                                                           tmp_path: Path) -> None:
    config = small_config(model_dir, tmp_path, storage=postgres_url, granularity="expert", bits=(2, 3, 4, 8),
                          num_windows=12, batch_jobs=2)
    setup = Worker(config)  # quantizes and enqueues once, so both workers spend their time measuring
    expected = len(setup.jobs)
    assert expected == 14 * 4
    command = [sys.executable, "-m", "mixprec", "-q", "measure", str(model_dir), "--work", str(tmp_path),
               "--storage", postgres_url, "--bits", "2", "3", "4", "8", "--granularity", "expert", "--windows",
               "12", "--seq-len", "24", "--device", "cpu", "--batch-jobs", "2", "--batch-windows", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    victim, survivor = (subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                        for _ in range(2))
    held = _kill_mid_job(postgres_url, victim)
    _, stderr = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, stderr.decode()[-2000:]

    states: dict[str, int] = {}
    for trial in _trials(postgres_url):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    assert states == {"COMPLETE": expected, "FAIL": held}, "each job done once; exactly the victim's jobs redone"
    table = load_measurement(config.folder).table  # written by the survivor, which finished last
    assert len(table) == expected and not table.duplicated(["group", "bits"]).any()
    assert set(zip(table["group"], table["bits"], strict=True)) == {(j.group, j.bits) for j in setup.jobs}
    workers = table["worker"].str.split(":").str[1].astype(int)
    assert set(workers) <= {victim.pid, survivor.pid} and survivor.pid in set(workers)
