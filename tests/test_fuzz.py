"""Property-based fuzzing (hypothesis) of what users hand mixprec: recipe and override YAML, config.json,
budgets on the command line.

The property (issue 12): a reader either accepts its input or raises a `MixprecError` (the CLI's one-line
error, exit 2), never any other exception; a command that fails writes nothing. Inputs are mutations of
valid files (a value replaced by any YAML/JSON value, a key dropped or added, the text cut or garbled),
so most examples get past the parser and exercise the checks behind it. Examples are derandomized (the
same cases on every machine) and no example database is written.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixprec.cli import main
from mixprec.core.errors import MixprecError
from mixprec.formats.exl3 import Exl3Overrides, recipe_to_exl3
from mixprec.formats.recipe import Budget, ModelRef, Recipe
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import ModelMap
from mixprec.quant import QuantSettings

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=25)

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["64", "4.0", "nan", "null", "fine", "rtn", "3f2a", "1" * 64]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def model(tiny_model_dirs: dict[str, Path]) -> tuple[Checkpoint, ModelMap]:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    return checkpoint, checkpoint.model_map("fine")


def _recipe(checkpoint: Checkpoint, model_map: ModelMap) -> dict[str, Any]:
    names = [g.name for g in model_map.select(DEFAULT_QUANTIZED_KINDS)]
    groups: dict[str, int | None] = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    recipe = Recipe(ModelRef("tiny", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    QuantSettings(), groups, Budget(bpw=3.0), {"bpw": 3.1}, {"solver": "dp"}, {"predicted": 0.01})
    return recipe.to_dict()


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into nested dicts and lists."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    found = []
    for key, value in items:
        found.append((*prefix, key))
        found.extend(_paths(value, (*prefix, key)))
    return found


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> str:
    """YAML text of `base` with one to three mutations: a value replaced, a key dropped or added, text cut."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUES)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if draw(st.booleans()) and draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=6)) + text[cut:]
    return text


def _accepts_or_mixprec_error(action: Any) -> None:
    try:
        action()
    except MixprecError:
        pass


@pytest.mark.parametrize("reader", ["recipe", "override"])
def test_yaml_readers_accept_or_raise_mixprec_error(model: tuple[Checkpoint, ModelMap], reader: str) -> None:
    checkpoint, model_map = model
    if reader == "recipe":
        base = _recipe(checkpoint, model_map)

        def read(text: str) -> None:
            Recipe.from_yaml(text).check_model(model_map, checkpoint.fingerprint)
    else:
        groups = {g.name: 4 for g in model_map.select(DEFAULT_QUANTIZED_KINDS)}
        base = recipe_to_exl3(groups, model_map, {4: "/q/4bpw"}).to_dict()

        def read(text: str) -> None:
            Exl3Overrides.from_yaml(text).resolve("model.layers.0.self_attn.q_proj.weight")

    @FAST
    @given(mutated(base))
    def check(text: str) -> None:
        _accepts_or_mixprec_error(lambda: read(text))

    check()


@FAST
@given(data=st.binary(max_size=64) | st.sampled_from([b"\xff\xfe", b"a: [" * 3000, b"a: 1\na: 2\n"]))
def test_recipe_files_of_any_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "r.yaml"
    path.write_bytes(data)
    _accepts_or_mixprec_error(lambda: Recipe.load(path))


@pytest.fixture(scope="module")
def model_copy(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fuzz-model") / "tiny"
    shutil.copytree(tiny_model_dirs["qwen2_moe"], target)
    return target


def test_config_json_accepts_or_raises_mixprec_error(model_copy: Path) -> None:
    base = json.loads((model_copy / "config.json").read_text())

    @FAST
    @given(st.one_of(VALUES.map(lambda v: json.dumps(v, allow_nan=True)), mutated(base).map(_yaml_to_json)))
    def check(text: str) -> None:
        (model_copy / "config.json").write_text(text)

        def open_it() -> None:
            checkpoint = Checkpoint.open(model_copy)
            checkpoint.model_map("fine")
        _accepts_or_mixprec_error(open_it)

    try:
        check()
    finally:
        (model_copy / "config.json").write_text(json.dumps(base))


def _yaml_to_json(text: str) -> str:
    try:
        return json.dumps(yaml.safe_load(text), allow_nan=True, default=str)
    except yaml.YAMLError:
        return text


BUDGETS = st.one_of(st.floats().map(repr), st.text(alphabet="0123456789.eE+-nafi", min_size=1, max_size=8),
                    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-1", "3", "abc"]))


@SLOW
@given(budget=BUDGETS, gib=st.booleans())
def test_search_budget_space_is_exit_0_or_2_and_writes_nothing(tiny_model_dirs: dict[str, Path], budget: str,
                                                                gib: bool, tmp_path_factory: pytest.TempPathFactory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Any --budget / --budget-gib string: argparse's or our one-line error (2), never a traceback; with no
    measurement (--no-measure) even a valid budget stops with 2 before writing anything."""
    root = tmp_path_factory.mktemp("budget")
    monkeypatch.chdir(root)
    argv = ["search", str(tiny_model_dirs["qwen2_moe"]), "--budget-gib" if gib else "--budget", budget,
            "--work", str(root / "work"), "--no-measure", "--seq-len", "32", "--windows", "2"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: "invalid float value"
        code = exc.code
    assert code == 2
    assert list(root.iterdir()) == [], f"{argv} wrote {list(root.iterdir())}"


@SLOW
@given(data=st.data())
def test_compile_of_fuzzed_recipes_writes_nothing_on_failure(model: tuple[Checkpoint, ModelMap], data: st.DataObject,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    checkpoint, model_map = model
    text = data.draw(mutated(_recipe(checkpoint, model_map)))
    root = tmp_path_factory.mktemp("compile")
    (root / "r.yaml").write_text(text)
    (root / "work").mkdir()  # no variants: even a valid recipe fails, but only after every check
    code = main(["compile", str(root / "r.yaml"), "--out", str(root / "out"), "--model", str(checkpoint.path),
                 "--work", str(root / "work"), "--granularity", "fine"])
    assert code == 2
    assert sorted(p.name for p in root.iterdir()) == ["r.yaml", "work"] and not any((root / "work").iterdir())
