"""The notebooks in notebooks/ execute without error (nbclient, a real ipykernel) and match their builders.

They run against a real work folder from the stages on the tiny Qwen2-MoE (`tests.report_helpers`),
not the bundled model: measuring the bundled model at six widths takes minutes, and the notebook
reads the same files either way. `MIXPREC_WORK` points the notebook at the folder.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_notebooks.py -q
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient import NotebookClient

from tests.report_helpers import BUDGETS, shared_work_folder

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_walkthrough", NOTEBOOKS / "build_walkthrough.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_is_the_builders_output() -> None:
    built = nbformat.writes(builder().build())  # type: ignore[arg-type]
    assert (NOTEBOOKS / "walkthrough.ipynb").read_text() == built, \
        "notebooks/walkthrough.ipynb is stale: run .venv/bin/python notebooks/build_walkthrough.py"


def test_walkthrough_executes(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    work = shared_work_folder(tmp_path_factory)
    monkeypatch.setenv("MIXPREC_WORK", str(work))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOKS / "walkthrough.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert f"budgets {[f'{b:g}bpw' for b in BUDGETS]}" in text
    for recipe in ("mixprec", "greedy", "hq", "uniform"):
        assert recipe in text, f"the recipe comparison should show {recipe}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5, "one displayed PNG per report figure"
    assert (work / "report" / "report.json").exists(), "build_report in the notebook writes WORK/report"
