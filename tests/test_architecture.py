"""The architecture is enforced, not just drawn: import-linter's layer contract, no cycles, short functions.

The contracts live in pyproject.toml (`[tool.importlinter]`): cli > report > search > measure | checkpoint >
formats > quant > model > bundled > core, and no import cycle between sibling modules. The second test
plants a wrong-way import in a copy of the package and checks the same command fails on it, so the first
test cannot pass by accident (e.g. a contract that matches no module).

Run: .venv/bin/python -m pytest tests/test_architecture.py -q
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"bundled", "checkpoint", "cli", "core", "formats", "measure", "model", "quant", "report", "search"}
MAX_FUNCTION_LINES = 60


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's own CLI on the package under `root` (found first on the path), without its cache."""
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-logo", "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layer_contract_and_acyclic_siblings_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "planted"), [
    ("core/errors.py", "from mixprec.cli import main as _wrong_way\n"),  # a low layer importing the top one
    ("quant/rtn.py", "import mixprec.search.solve as _wrong_way\n"),
    ("measure/table.py", "from mixprec.checkpoint import compile as _sibling\n"),  # independent siblings
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path: Path, module: str, planted: str) -> None:
    shutil.copytree(ROOT / "mixprec", tmp_path / "mixprec", ignore=shutil.ignore_patterns("bundled", "__pycache__"))
    (tmp_path / "mixprec" / "bundled").mkdir()
    for name in ("__init__.py", "corpus.py"):  # the bundled modules the others import; not the model files
        shutil.copy(ROOT / "mixprec" / "bundled" / name, tmp_path / "mixprec" / "bundled" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "mixprec" / module
    target.write_text(target.read_text(encoding="utf-8") + "\n" + planted, encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr


def test_package_root_holds_only_stage_packages() -> None:
    entries = {p.name for p in (ROOT / "mixprec").iterdir() if p.name != "__pycache__"}
    assert entries == STAGES | {"__init__.py", "__main__.py"}, sorted(entries - STAGES)


def test_no_function_is_longer_than_the_style_limit() -> None:
    long = []
    for path in sorted((ROOT / "mixprec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


def test_readme_file_tree_lists_every_module() -> None:
    """The README's file tree is the newcomer's map: every module has its line (add one with each new module)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tree = readme[readme.index("## File structure"):]
    listed = {line.split()[0] for line in tree.splitlines() if line.startswith("mixprec/")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mixprec").rglob("*.py")}
    assert not modules - listed, f"modules missing from README's File structure: {sorted(modules - listed)}"
    assert not {m for m in listed if m.endswith(".py")} - modules, "README lists modules that do not exist"
