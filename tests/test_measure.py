"""Measurement tables on the tiny Qwen2-MoE: contents, both modes, exports, resume, stale jobs, fingerprints.

Run: .venv/bin/python -m pytest tests/test_measure.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mixprec.core.errors import FingerprintMismatchError, MixprecError
from mixprec.core.storage import open_storage
from mixprec.measure.config import MeasureConfig
from mixprec.measure.run import Worker, run_measure
from mixprec.measure.store import Job, JobStore
from mixprec.measure.table import load_measurement
from tests.measure_helpers import model_with_splits, small_config, work_with_variants


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path_factory.mktemp("measure") / "tiny")


@pytest.fixture(scope="module")
def drop_table(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = small_config(model_dir, tmp_path_factory.mktemp("work"))
    return config, load_measurement(run_measure(config))


@pytest.fixture
def work(drop_table, tmp_path: Path) -> Path:
    """An empty work folder with the variants of the shared drop table already in place."""
    return work_with_variants(drop_table[0].work, tmp_path / "work")


def test_drop_table_has_one_row_per_group_and_bits(drop_table) -> None:
    config, measurement = drop_table
    table = measurement.table
    groups = [g for g in measurement.summary.groups]
    assert len(groups) == 12  # fine groups of the tiny model: attention q/kv/o, mlp/shared/experts gate_up/down
    assert len(table) == len(groups) * 3
    assert not table.duplicated(["group", "bits"]).any()
    assert set(table["bits"]) == {2, 4, 8}
    assert (table["mode"] == "drop").all() and (table["base_bits"] == 32).all()  # tiny model is saved in fp32
    assert (table["dkl"] == table["kl_mean"]).all()
    assert (table["kl_mean"] > 0).all() and (table["kl_se"] > 0).all()
    assert (table["delta_bits"] < 0).all()
    assert (table["delta_bits"] == table["storage_bits"] - table["params"] * 32).all()
    assert (table["n_tokens"] == 6 * 23).all()


def test_summary_records_identity_and_floors(drop_table) -> None:
    config, measurement = drop_table
    summary = measurement.summary
    assert summary.noise_floor_kl("repeat_fp32") == 0.0  # fp32 forwards are bitwise repeatable
    assert summary.noise_floor_kl("bf16_compute") > 0
    assert summary.data.split == "calibration" and summary.data.num_windows == 6
    assert summary.engine["dtype"] == "float32" and summary.engine["device"] == "cpu"
    assert set(summary.variants) == {"2", "4", "8"} and all(len(v.sha256) == 64 for v in summary.variants.values())
    assert summary.counts["trials"] == {"COMPLETE": 36}


def test_two_bits_hurt_more_than_eight(drop_table) -> None:
    _, measurement = drop_table
    kl = measurement.pivot("kl_mean")
    assert (kl[2] > kl[8]).all(), kl


def test_exl3_export_shape(drop_table) -> None:
    config, measurement = drop_table
    exl3 = json.loads((config.folder / "measurement.json").read_text())
    assert exl3["base"]["dir"].endswith("rtn-b2-g64-sym") and [a["dir"][-14:] for a in exl3["alts"]] == [
        "rtn-b4-g64-sym", "rtn-b8-g64-sym"]
    assert exl3["base"]["bpw"] < exl3["alts"][0]["bpw"] < exl3["alts"][1]["bpw"]
    assert len(exl3["groups"]) == 12 and all(len(g["candidates"]) == 2 for g in exl3["groups"])
    first = exl3["groups"][0]
    assert first["layers"] == ["model.layers.0.self_attn.q_proj"]
    row = measurement.table.set_index(["group", "bits"])
    expected = row.loc[("layers.0.attn.q", 8), "kl_mean"] - row.loc[("layers.0.attn.q", 2), "kl_mean"]
    assert first["candidates"][1]["dkld"] == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert all(c["dbits"] > 0 for g in exl3["groups"] for c in g["candidates"])


def test_raise_mode_pairs_with_base(model_dir: Path, work: Path) -> None:
    config = small_config(model_dir, work, mode="raise", base_bits=2, granularity="layer")
    measurement = load_measurement(run_measure(config))
    table, base = measurement.table, measurement.summary.base_kl
    assert set(table["bits"]) == {4, 8} and (table["base_bits"] == 2).all()
    assert (table["delta_bits"] > 0).all()
    # raising one group removes part of the base's damage; the paired difference is exactly kl - base
    assert ((table["kl_mean"] - base - table["dkl"]).abs() < 1e-12).all()
    assert (table["dkl"] < 0).sum() >= len(table) - 1
    exl3 = json.loads((config.folder / "measurement.json").read_text())
    assert exl3["base_kld"] == pytest.approx(base) and exl3["mixprec"]["mode"] == "raise"


def test_interrupted_run_resumes_to_same_table(model_dir: Path, work: Path, drop_table) -> None:
    _, reference = drop_table
    first = Worker(small_config(model_dir, work, max_jobs=7))
    assert first.run() == 7
    assert first.write() is None, "an incomplete table must not be written"
    resumed = Worker(small_config(model_dir, work))
    assert resumed.run() == 36 - 7
    table = load_measurement(resumed.write()).table
    cols = ["group", "bits", "kl_mean", "kl_p99", "same_top1", "storage_bits"]
    pd.testing.assert_frame_equal(table[cols], reference.table[cols], rtol=1e-4)


def _dead_pid_owner() -> dict[str, object]:
    import subprocess
    import sys

    from mixprec.measure.store import process_owner

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return {**process_owner(), "pid": process.pid, "start": "0"}


def test_stale_job_of_dead_worker_is_measured_again(model_dir: Path, work: Path) -> None:
    config = small_config(model_dir, work, granularity="layer", bits=(2, 8))
    worker = Worker(config)
    claimed = worker.store.claim(2)
    for trial_id, _ in claimed:
        worker.store.storage.set_trial_user_attr(trial_id, "owner", _dead_pid_owner())
    other = Worker(config)  # a new worker finds the two RUNNING jobs of a dead process
    assert other.store.counts() == {"FAIL": 2, "WAITING": 10}
    assert other.run() == 10
    assert other.write() is not None


def test_job_of_a_worker_killed_mid_claim_is_measured_again_at_once(model_dir: Path, work: Path) -> None:
    """A claimer killed between flipping a job to RUNNING and writing its owner leaves an ownerless RUNNING
    trial. Claims hold the folder's lock, so the next run (which takes the lock too) recovers it at once
    instead of after the grace period (the kill -9 test was flaky when its kill landed there)."""
    import optuna

    config = small_config(model_dir, work, granularity="layer", bits=(2, 8))
    worker = Worker(config)
    waiting = worker.store._trials([optuna.trial.TrialState.WAITING])[0]
    worker.store.storage.set_trial_state_values(waiting._trial_id, optuna.trial.TrialState.RUNNING)  # no owner
    other = Worker(config)
    assert other.store.counts() == {"FAIL": 1, "WAITING": 10}
    assert other.run() == 10 and other.write() is not None


def test_running_job_of_live_worker_is_left_alone(model_dir: Path, work: Path) -> None:
    config = small_config(model_dir, work, granularity="layer", bits=(2, 8))
    worker = Worker(config)
    worker.store.claim(1)  # owned by this (live) process
    assert Worker(config).store.counts() == {"RUNNING": 1, "WAITING": 9}
    assert worker.store.recover_stale(reset_stale=False) == 0


def test_duplicate_waiting_trials_are_discarded(model_dir: Path, work: Path) -> None:
    """On a shared database two first-time workers may enqueue a job twice; only one is ever measured."""
    config = small_config(model_dir, work, bits=(2,), granularity="layer")
    worker = Worker(config)
    worker.store.study.enqueue_trial({}, user_attrs=worker.jobs[0].attrs())
    assert worker.run() == len(worker.jobs)
    counts = worker.store.counts()
    assert counts == {"COMPLETE": len(worker.jobs), "FAIL": 1}


def test_mismatched_fingerprints_are_refused(model_dir: Path, work: Path, tmp_path: Path, tiny_model_dirs) -> None:
    run_measure(small_config(model_dir, work, bits=(2,), granularity="layer"))
    with pytest.raises(FingerprintMismatchError, match="data"):
        Worker(small_config(model_dir, work, bits=(2,), granularity="layer", num_windows=5))
    with pytest.raises(FingerprintMismatchError, match="settings"):
        Worker(small_config(model_dir, work, bits=(2,), granularity="layer", kinds=("attention",)))
    other = model_with_splits(tiny_model_dirs["mixtral"], tmp_path / "other")
    storage = str(small_config(model_dir, work, granularity="layer").folder / "journal.log")
    with pytest.raises(FingerprintMismatchError, match="model"):
        Worker(small_config(other, tmp_path / "w2", bits=(2,), granularity="layer", storage=storage))


def test_fingerprint_check_on_the_store_itself(tmp_path: Path) -> None:
    storage = open_storage(None, tmp_path)
    JobStore(storage, {"model": "a", "data": "d", "settings": {}, "variants": {"v2": "x"}})
    JobStore(storage, {"model": "a", "data": "d", "settings": {}, "variants": {"v3": "y"}})  # new width: fine
    with pytest.raises(FingerprintMismatchError, match="variant v2"):
        JobStore(storage, {"model": "a", "data": "d", "settings": {}, "variants": {"v2": "z"}})
    assert Job("layers.0.attn", 4, 0).key == "layers.0.attn@4"


def test_missing_variants_without_quantize_name_the_command(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MixprecError, match="mixprec quantize --bits 2 4 8"):
        Worker(small_config(model_dir, tmp_path, quantize_missing=False))


@pytest.mark.parametrize("bad, match", [
    (dict(mode="sideways"), "mode"),
    (dict(mode="raise", base_bits=8, bits=(2, 4)), "needs some --bits above"),
    (dict(bits=(2, 2)), "repeats"),
    (dict(bits=(9,)), "bits=9"),
    (dict(granularity="row"), "row"),
])
def test_bad_settings_fail_before_loading(bad: dict[str, object], match: str, tmp_path: Path) -> None:
    with pytest.raises((MixprecError, ValueError), match=match):
        MeasureConfig(work=tmp_path, **bad)  # type: ignore[arg-type]


def test_cli_prints_table_and_files(model_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixprec.cli import main

    code = main(["measure", str(model_dir), "--work", str(work), "--bits", "2", "8", "--mode", "raise",
                 "--base-bits", "2", "--windows", "4", "--seq-len", "16", "--device", "cpu", "--no-quantize",
                 "--granularity", "layer"])
    out = capsys.readouterr().out
    assert code == 0
    assert "raising one group from 2 bits" in out and "layers.1.experts" in out and "8b" in out
    assert "noise floor: repeat fp32 0.0e+00" in out
    assert str(work / "measure" / "raise-b2-layer" / "table.csv") in out
    assert main(["measure", str(model_dir), "--work", str(work), "--bits", "3", "--no-quantize"]) == 2


def test_damaged_variant_is_refused_or_rebuilt(model_dir: Path, work: Path) -> None:
    """A bit-flipped variant file must never be measured (it gave NaN KL and exit 0): --no-quantize refuses it
    naming the file, the default quantizes it again."""
    from mixprec.core.errors import VariantError
    from mixprec.core.fileio import sha256_file

    weights = next(work.glob("variants/rtn-b2-*/quantized.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-50] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VariantError, match=f"{weights.parent.name}.*sha256"):
        Worker(small_config(model_dir, work, quantize_missing=False))
    measurement = load_measurement(run_measure(small_config(model_dir, work)))
    assert measurement.table["dkl"].notna().all() and (measurement.table["dkl"].abs() < 1e3).all()
    manifest = json.loads((weights.parent / "manifest.json").read_text())
    assert sha256_file(weights) == manifest["file_sha256"], "the damaged variant is quantized again"


def test_another_storage_does_not_overwrite_a_finished_table(model_dir: Path, drop_table, tmp_path: Path) -> None:
    import shutil

    config, _ = drop_table
    work = tmp_path / "work"
    shutil.copytree(config.work, work)
    folder = small_config(model_dir, work).folder
    before = (folder / "table.csv").read_bytes()
    with pytest.raises(MixprecError, match="already holds a finished table"):
        run_measure(small_config(model_dir, work, storage=str(tmp_path / "other.log")))
    assert (folder / "table.csv").read_bytes() == before and not (tmp_path / "other.log").exists()
    assert run_measure(small_config(model_dir, work)) == folder, "the table's own storage still reuses it"


def test_torn_last_journal_record_is_dropped_and_the_run_finishes(model_dir: Path, work: Path, drop_table,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Power loss mid-write leaves half a record; the next run must not append onto it (JSONDecodeError forever)."""
    _, reference = drop_table
    first = Worker(small_config(model_dir, work, max_jobs=7))
    assert first.run() == 7
    journal = first.config.folder / "journal.log"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code":5,"worker_id":"x","trial_id":3,"state":1,"val')
    with caplog.at_level("WARNING"):
        resumed = Worker(small_config(model_dir, work))
    assert "torn journal records" in caplog.text
    assert resumed.run() == 36 - 7, "every complete record (7 finished jobs) is kept"
    table = load_measurement(resumed.write()).table
    cols = ["group", "bits", "kl_mean", "storage_bits"]
    pd.testing.assert_frame_equal(table[cols], reference.table[cols], rtol=1e-4)
    assert Worker(small_config(model_dir, work)).run() == 0, "and the journal reads cleanly afterwards"
