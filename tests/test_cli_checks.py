"""Bad command-line input fails first, in one line with exit code 2, and writes nothing.

Each case here was a traceback, a silent wrong result or minutes of wasted work before the check moved
to the start of the command (issue 12).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mixprec.cli import main
from mixprec.core.errors import MixprecError
from mixprec.model.data import WindowConfig, load_windows
from tests.measure_helpers import model_with_splits

TINY_POSITIONS = 128  # tests/tiny_models.py


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("cli") / "tiny-moe")


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{argv}: exit {code}, stderr {err[-500:]}"
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [["measure"], ["search", "--budget", "3"], ["demo", "--budgets", "3"]])
def test_seq_len_beyond_the_models_positions_is_refused(command: list[str], tiny_model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    argv = [command[0], str(tiny_model), *command[1:], "--work", str(work), "--seq-len", str(TINY_POSITIONS + 1)]
    if command[0] != "demo":
        argv += ["--windows", "2"]
    _fails(argv, capsys, "max_position_embeddings 128", f"--seq-len {TINY_POSITIONS}")
    assert not work.exists(), "nothing may be written before the check"


def test_eval_and_calibration_seq_len_are_checked(tiny_model: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["eval", str(tiny_model), "--reference", str(tiny_model), "--seq-len", "129", "--windows", "2"],
           capsys, "max_position_embeddings 128")
    _fails(["quantize", str(tiny_model), "--method", "gptq", "--bits", "4", "--work", str(tmp_path / "w"),
            "--calib-seq-len", "500"], capsys, "--calib-seq-len 500", "max_position_embeddings 128")
    assert not (tmp_path / "w").exists()
    with pytest.raises(MixprecError, match="max_position_embeddings"):
        load_windows(tiny_model, "calibration", WindowConfig(seq_len=129, num_windows=2))


BAD_STORAGES = {
    "postgresql://user:secret@127.0.0.1:9/none": "cannot open --storage",  # nothing listens on port 9
    "mysql://127.0.0.1/none": "driver",
    "redis://x": "scheme 'redis' is not an Optuna storage",
    "sqlite:/x.db": "no '//'",
    "not a url": "neither a storage URL nor a journal file path",
    "/dev/null/journal.log": "/dev/null is not a folder",
    "sqlite:////dev/null/x.db": "/dev/null is not a folder",
}


@pytest.mark.parametrize("url", list(BAD_STORAGES))
@pytest.mark.parametrize("command", ["measure", "search"])
def test_bad_storage_is_one_line_and_writes_nothing(url: str, command: str, tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [command, str(tiny_model), "--work", "w", "--storage", url, "--windows", "2", "--seq-len", "16"]
    line = _fails(argv + (["--budget", "3"] if command == "search" else []), capsys, BAD_STORAGES[url])
    assert "secret" not in line, "a password must not be printed"
    assert list(tmp_path.iterdir()) == [], "a typo must not become a journal file (or anything else) here"


def test_storage_forms_that_are_accepted(tmp_path: Path) -> None:
    from mixprec.core.storage_url import check_storage

    for url in (f"sqlite:///{tmp_path}/new/folder/s.db", str(tmp_path / "j.log"), "postgresql+psycopg://u@h/db"):
        check_storage(url)  # a missing sqlite/journal folder is created when the storage is opened
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--export-exl3"])
def test_search_does_not_overwrite_a_file_it_did_not_write(flag: str, tiny_model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "mine.yaml"
    target.write_text("my notes\n")
    base = ["search", str(tiny_model), "--budget", "3", "--work", str(tmp_path / "w"), "--seq-len", "32"]
    _fails([*base, flag, str(target)], capsys, flag, "--force")
    assert target.read_text() == "my notes\n" and not (tmp_path / "w").exists()
    _fails([*base, flag, str(tmp_path)], capsys, "is a folder")
    _fails([*base, flag, "/dev/null/sub/r.yaml"], capsys, "/dev/null is not a folder")


def test_files_mixprec_wrote_may_be_replaced(tmp_path: Path) -> None:
    from mixprec.cli.checks import check_out_file, is_override_file, is_recipe_file

    recipe, override = tmp_path / "r.yaml", tmp_path / "o.yaml"
    recipe.write_text("schema_version: 1\nkind: mixprec.recipe\ngroups: {}\n")
    override.write_text("sources: []\noverrides: []\n")
    check_out_file(recipe, "--out", is_recipe_file)
    check_out_file(override, "--export-exl3", is_override_file)
    with pytest.raises(MixprecError, match="not a file mixprec wrote"):
        check_out_file(override, "--out", is_recipe_file)
    check_out_file(override, "--out", is_recipe_file, force=True)


# -- the traceback cases of issue 12 (each was exit 1 with a traceback) ---------------------------------------

def _model_variant(tiny_model: Path, root: Path, damage: str) -> Path:
    """A copy of the tiny model with one file damaged the way a user's download might be."""
    import shutil

    model = root / f"model-{damage}"
    shutil.copytree(tiny_model, model)
    if damage == "config-list":
        (model / "config.json").write_text("[1, 2]")
    elif damage == "config-binary":
        (model / "config.json").write_bytes(b"\xff\xfe{\x00")
    elif damage == "index-list":
        (model / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    elif damage == "index-outside":
        (model / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../other/model.safetensors"}}')
    return model


@pytest.mark.parametrize("damage, needle", [("config-list", "JSON object"), ("config-binary", "UTF-8"),
                                            ("index-list", "weight_map"), ("index-outside", "outside the model")])
def test_damaged_model_folder_is_one_line(damage: str, needle: str, tiny_model: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["inspect", str(_model_variant(tiny_model, tmp_path, damage))], capsys, needle)


@pytest.mark.parametrize("argv, needle", [
    (["search", "--budget", "nan"], "--budget nan is not a finite number"),
    (["search", "--budget", "inf"], "--budget inf"),
    (["search", "--budget", "1e400"], "--budget inf"),
    (["search", "--budget-gib", "nan"], "--budget-gib nan"),
    (["search", "--budget", "-1"], "positive"),
    (["demo", "--budgets", "3", "nan"], "--budgets nan"),
    (["measure", "--cache-mib", "nan"], "--cache-mib nan"),
    (["quantize", "--damp", "inf"], "--damp inf"),
    (["search", "--budget", "3", "--screen-z", "nan"], "--screen-z nan"),
    (["search", "--budget", "3", "--screen", "1.5"], "screen=1.5 must be a fraction of the windows in [0, 1]"),
    (["search", "--budget", "3", "--screen", "0.5", "--multi-objective"], "needs the single-objective search"),
])
def test_non_finite_numbers_fail_before_any_work(argv: list[str], needle: str, tiny_model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    windows = [] if argv[0] == "quantize" else ["--seq-len", "32"]
    _fails([argv[0], str(tiny_model), *argv[1:], "--work", str(work), *windows], capsys, needle)
    assert not work.exists(), "demo used to quantize and measure before failing on the budget"


def test_paths_of_the_wrong_kind(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, afile = tmp_path / "folder", tmp_path / "afile"
    folder.mkdir()
    afile.write_text("x")
    model = str(tiny_model)
    _fails(["measure", model, "--data", str(folder), "--work", str(tmp_path / "w")], capsys, "--data", "folder")
    _fails(["measure", model, "--work", str(afile)], capsys, "--work", "is a file")
    _fails(["compile", str(folder), "--out", str(tmp_path / "o"), "--model", model], capsys, "RECIPE", "folder")
    _fails(["eval", model, "--reference", model, "--json", str(folder), "--seq-len", "16"], capsys, "--json")
    _fails(["search", model, "--budget", "3", "--eval-data", str(tmp_path / "none.txt")], capsys, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]


def test_dashboard_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _fails(["dashboard", "--storage", str(tmp_path / "none.log"), "--port", str(port)], capsys, "not free")
    _fails(["dashboard", "--storage", str(tmp_path / "none.log"), "--port", "70000"], capsys, "out of range")
