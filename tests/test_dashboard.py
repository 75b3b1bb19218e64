"""`mixprec dashboard`: a real optuna-dashboard server on 127.0.0.1 answering HTTP for a real study.

The study comes from a real search on the tiny Qwen2-MoE (`tests.report_helpers`); the report is
attached to it first, so the study's figures, summary and the trials' recipe YAML must all open
through the dashboard's artifact routes. The server is a subprocess on a free port, polled with a
deadline and always terminated.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_dashboard.py -q
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from mixprec.core.errors import MixprecError
from mixprec.formats.recipe import Recipe
from mixprec.report import build_report
from mixprec.report.dashboard import DashboardConfig, find_storage, study_urls
from tests.report_helpers import shared_work_folder

STUDY = "tiny-3bpw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the shared work folder (attached to its studies); returns the report folder."""
    out = tmp_path_factory.mktemp("report")
    build_report(shared_work_folder(tmp_path_factory), out_dir=out, dpi=60)
    return out


@pytest.fixture(scope="module")
def work(report: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_work_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[str]:
    """`python -m mixprec dashboard --study tiny-3bpw --studies-dir W/studies --port P`; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "mixprec", "dashboard", "--study", STUDY, "--studies-dir",
               str(work / "studies"), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"the dashboard exited with {process.returncode}: {process.stderr.read()}")  # type: ignore[union-attr]
            try:
                get(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail("the dashboard did not answer within 60 s")
                time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_dashboard_serves_the_study_and_its_trials(work: Path, server: str) -> None:
    summaries = json.loads(get(f"{server}/api/studies"))["study_summaries"]
    assert [s["study_name"] for s in summaries] == [STUDY]
    study_id = summaries[0]["study_id"]
    detail = json.loads(get(f"{server}/api/studies/{study_id}"))
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{work}/studies/{STUDY}.db")
    assert len(detail["trials"]) == len(study.trials) >= 6
    served = {t["number"]: t for t in detail["trials"]}
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):  # enqueued seeds may wait
        attrs = {a["key"]: a["value"] for a in served[trial.number]["user_attrs"]}
        assert json.loads(attrs["assignment"]) == trial.user_attrs["assignment"]
        assert served[trial.number]["values"] == pytest.approx(trial.values)
    assert "Pareto front" in detail["note"]["body"], "the report summary should be the study's note"


def test_recipe_and_figure_artifacts_open(work: Path, report: Path, server: str) -> None:
    detail = json.loads(get(f"{server}/api/studies/1"))
    trial = detail["trials"][0]
    assert trial["state"] == "Complete"
    recipes = [a for a in trial["artifacts"] if a["filename"].endswith("recipe.yaml")]
    assert len(recipes) == 1, "the search attaches one recipe YAML per trial"
    text = get(f"{server}/artifacts/1/{trial['trial_id']}/{recipes[0]['artifact_id']}").decode()
    values = {a["key"]: a["value"] for a in trial["user_attrs"]}
    assert Recipe.from_yaml(text).groups == json.loads(values["assignment"])
    figures = {a["filename"].rsplit("-", 1)[0]: a["artifact_id"] for a in detail["artifacts"]
               if a["filename"].endswith(".png")}
    assert {"pareto", "bitmap", "sensitivity", "additivity", "uncertainty"} <= set(figures)
    assert get(f"{server}/artifacts/1/{figures['pareto']}").startswith(b"\x89PNG\r\n\x1a\n")
    links = re.findall(r"!\[Pareto front\]\((/artifacts/1/[0-9a-f-]+)\)", detail["note"]["body"])
    assert len(links) == 1, "the note shows the Pareto figure from its artifact"
    assert get(f"{server}{links[0]}") == (report / "figures" / "pareto.png").read_bytes(), "note links a stale figure"
    assert b"<html" in get(f"{server}/dashboard/studies/1").lower(), "the web page itself is served"


def test_storage_lookup_and_config_errors(work: Path, tmp_path: Path) -> None:
    studies = work / "studies"
    assert find_storage(STUDY, None, studies) == f"sqlite:///{studies / STUDY}.db"
    with pytest.raises(MixprecError, match="2 study databases"):
        find_storage(None, None, studies)
    with pytest.raises(MixprecError, match="no study database .*tiny-3bpw"):
        find_storage("nope", None, studies)
    with pytest.raises(MixprecError, match="no study database in .*run `mixprec search` first"):
        find_storage(None, None, tmp_path)
    with pytest.raises(MixprecError, match="no study storage"):
        find_storage(None, f"sqlite:///{tmp_path}/missing.db", studies)
    with pytest.raises(MixprecError, match="not a TCP port"):
        DashboardConfig(f"sqlite:///{studies / STUDY}.db", port=70000)
    config = DashboardConfig(f"sqlite:///{studies / STUDY}.db", port=8123)
    assert config.artifacts == studies / "artifacts"
    assert study_urls(config) == {STUDY: "http://localhost:8123/dashboard/studies/1"}
