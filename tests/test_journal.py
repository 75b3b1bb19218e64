"""Journal repair: a torn record is dropped, every complete one kept, and Optuna reads the result."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from mixprec.core.journal import repair_journal


def _journal(path: Path, trials: int) -> bytes:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="s", storage=storage)
    for i in range(trials):
        study.enqueue_trial({"x": float(i)})
        study.optimize(lambda t: t.suggest_float("x", 0, 10), n_trials=1)
    return path.read_bytes()


def _values(path: Path) -> list[float]:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return [t.value for t in optuna.load_study(study_name="s", storage=storage).trials]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_clean_journal_is_left_alone(tmp_path: Path) -> None:
    data = _journal(tmp_path / "j.log", 3)
    assert repair_journal(tmp_path / "j.log") == 0 and (tmp_path / "j.log").read_bytes() == data
    assert repair_journal(tmp_path / "absent.log") == 0


@pytest.mark.parametrize("cut", [1, 7, 30])
def test_torn_tail_is_dropped_and_appending_works_again(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "j.log"
    data = _journal(path, 3)
    path.write_bytes(data + data.splitlines(keepends=True)[-1][:cut])
    assert repair_journal(path) == cut
    assert path.read_bytes() == data
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    optuna.load_study(study_name="s", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 10), n_trials=1)
    assert _values(path)[:3] == [0.0, 1.0, 2.0] and len(_values(path)) == 4


def test_record_appended_onto_a_torn_one_is_split_back_out(tmp_path: Path) -> None:
    """A file an unrepaired run already appended onto: the later whole record is kept, the torn prefix dropped."""
    path = tmp_path / "j.log"
    data = _journal(path, 2)
    lines = data.splitlines(keepends=True)
    damaged = b"".join(lines[:-2]) + lines[-2][:9] + lines[-2] + lines[-1]
    path.write_bytes(damaged)
    with pytest.raises(ValueError):
        _values(path)
    assert repair_journal(path) == 9
    assert path.read_bytes() == data and _values(path) == [0.0, 1.0]
