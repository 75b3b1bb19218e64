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

import optuna
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


def _trials(storage: object) -> list:
    from mixprec.measure.store import STUDY_NAME

    return optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials(deepcopy=False)


def _kill_mid_job(url: str, victim: subprocess.Popen, survivor: subprocess.Popen, timeout: float = 240) -> int:
    """SIGKILL `victim` while it holds claimed jobs whose owner is written; returns how many it held.

    Both workers are frozen (SIGSTOP) while the table is read, so neither can claim, finish or record an owner
    between the read and the kill: the count is exact, and a check that takes long (a slow CI machine) costs
    the workers no progress, so the victim cannot run to the end while the test is still looking. A claim
    seen without its owner record yet (it is written just after the state) means try again.
    """
    storage = optuna.storages.get_storage(url)  # one connection pool: a fresh one per check is slow
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert victim.poll() is None, "the victim finished before it could be killed; give it more jobs"
        for worker in (victim, survivor):
            worker.send_signal(signal.SIGSTOP)
        try:
            running = [t for t in _trials(storage) if t.state.name == "RUNNING"]
            held = [t for t in running if t.user_attrs.get("owner", {}).get("pid") == victim.pid]
            if held and all("owner" in t.user_attrs for t in running):
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                return len(held)
        finally:
            for worker in (victim, survivor):
                if worker.poll() is None:
                    worker.send_signal(signal.SIGCONT)
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
    held = _kill_mid_job(postgres_url, victim, survivor)
    _, stderr = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, stderr.decode()[-2000:]

    states: dict[str, int] = {}
    for trial in _trials(optuna.storages.get_storage(postgres_url)):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    assert states == {"COMPLETE": expected, "FAIL": held}, "each job done once; exactly the victim's jobs redone"
    table = load_measurement(config.folder).table  # written by the survivor, which finished last
    assert len(table) == expected and not table.duplicated(["group", "bits"]).any()
    assert set(zip(table["group"], table["bits"], strict=True)) == {(j.group, j.bits) for j in setup.jobs}
    workers = table["worker"].str.split(":").str[1].astype(int)
    assert set(workers) <= {victim.pid, survivor.pid} and survivor.pid in set(workers)
