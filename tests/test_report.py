"""`mixprec report` on a real small work folder: every group and budget listed, real PNGs, named axes.

The work folder comes from the real stages on the tiny Qwen2-MoE (`tests.report_helpers`): three
variants, a drop-mode measurement, and searches at 2.5 and 3 bpw with SQLite studies.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from mixprec.cli import main
from mixprec.core.errors import MixprecError
from mixprec.formats.recipe import Recipe
from mixprec.measure.summary import MeasurementSummary
from mixprec.measure.table import TABLE_COLUMNS, Measurement
from mixprec.report import build_report, collect, tables
from mixprec.report import figures as fig
from mixprec.report.front import additive_front
from mixprec.report.render import attach_to_studies
from tests.report_helpers import BITS, BUDGETS, shared_work_folder

FIGURES = {"pareto", "bitmap", "sensitivity", "additivity", "uncertainty"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_work_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def report(work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mixprec report --work W --recipe OUTSIDE --out R` through the CLI entry point; returns R."""
    out = tmp_path_factory.mktemp("report")
    extra = out.parent / "outside-3bpw.yaml"  # a recipe outside the work folder, given with --recipe
    shutil.copyfile(work / "recipes" / "tiny-3bpw.yaml", extra)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["report", "--work", str(work), "--recipe", str(extra), "--out", str(out), "--dpi", "80"])
    assert code == 0
    assert f"wrote {out / 'index.html'}" in printed.getvalue()
    return out


def all_groups(work: Path) -> list[str]:
    groups = {g for p in (work / "recipes").glob("*.yaml") for g in Recipe.load(p).groups}
    assert len(groups) >= 10, "the tiny model should have attention, dense, shared and routed groups"
    return sorted(groups)


def test_report_lists_every_group_and_budget(work: Path, report: Path) -> None:
    index = json.loads((report / "report.json").read_text())
    groups, budgets = all_groups(work), [f"{b:g}bpw" for b in BUDGETS]
    assert sorted(index["groups"]) == groups
    assert index["budgets"] == budgets, "budgets are listed in size order"
    html, md = (report / "index.html").read_text(), (report / "summary.md").read_text()
    for text in (html, md):
        for name in groups:
            assert f">{name}<" in text or f"| {name} |" in text, f"group {name} missing from the report"
        for budget in budgets:
            assert budget in text
        for recipe in ("mixprec", "greedy", "hq", "uniform", "outside-3bpw"):
            assert recipe in text
    assert {Path(f["file"]).stem for f in index["figures"]} == FIGURES
    for name in FIGURES:
        assert f"src='figures/{name}.png'" in html and f"](figures/{name}.png)" in md


def test_figures_are_real_readable_pngs(report: Path) -> None:
    for name in FIGURES:
        with Image.open(report / "figures" / f"{name}.png") as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 250, f"{name} is too small to read: {image.size}"
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10, f"{name}.png looks blank"


def _axes(figure: object) -> list[object]:
    return [ax for ax in figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]  # type: ignore[attr-defined]


def test_every_plot_has_named_axes_a_title_and_log_kl(work: Path) -> None:
    data = collect(work)
    m = data.measurement
    assert m is not None
    drawn = {
        "pareto": fig.pareto_figure(additive_front(m), data.comparison(), "t"),
        "bitmap": fig.bit_map_figure(data.bit_table(), {r.label: r.label for r in data.recipes}, "t"),
        "sensitivity": fig.sensitivity_heatmap(m.table, "t"),
        "additivity": fig.additivity_figure(data.trials(), data.comparison(), "t"),
        "uncertainty": fig.uncertainty_figure(m.table, 1e-7, "t"),
    }
    for name, figure in drawn.items():
        axes = _axes(figure)
        assert axes, name
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unnamed axis"
            assert ax.get_title() or figure.get_suptitle(), f"{name}: no title"
    assert len(_axes(drawn["sensitivity"])) == len(BITS), "one heatmap panel per measured width"
    assert len(_axes(drawn["bitmap"])) == len(BUDGETS), "one bit map per recipe"
    assert {ax.get_yscale() for ax in _axes(drawn["pareto"])} == {"log"}
    assert {ax.get_xscale() for ax in _axes(drawn["additivity"])} == {"log"}
    assert len(_axes(drawn["pareto"])) == 2, "every size, and a zoom on the budgets"
    legend = [t.get_text() for t in _axes(drawn["pareto"])[-1].get_legend().get_texts()]
    assert any("greedy" in t for t in legend) and any("--hq" in t for t in legend)
    assert any("uniform" in t for t in legend)
    ours = [c for c in _axes(drawn["pareto"])[0].containers if c.get_label() == "mixprec (held-out, ± SE)"]
    assert len(ours) == 1 and len(ours[0].lines[0].get_xdata()) == len(BUDGETS), "one mixprec point per budget"


def test_collect_reads_trials_front_and_comparisons(work: Path) -> None:
    data = collect(work)
    trials = data.trials()
    for budget in BUDGETS:
        study = optuna.load_study(study_name=f"tiny-{budget:g}bpw", storage=f"sqlite:///{work}/studies/"
                                  f"tiny-{budget:g}bpw.db")
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        mine = trials[trials["study"] == study.study_name].set_index("number")
        assert len(mine) == len(complete)
        for t in complete:
            assert mine.loc[t.number, "kl"] == t.values[0]
            assert mine.loc[t.number, "predicted"] == t.user_attrs["metrics"]["predicted"]
    front = additive_front(data.measurement)
    assert (np.diff(front["bpw"]) > 0).all() and (np.diff(front["predicted"]) < 0).all(), "a front is monotone"
    searched = data.variants[data.variants["group_size"] == 64]  # others: uniform quants built for the comparison
    assert front["bpw"].min() == pytest.approx(searched["bpw"].min())
    assert front["bpw"].max() == pytest.approx(searched["bpw"].max())
    comparison = data.comparison()
    assert set(comparison["budget"]) == {f"{b:g}bpw" for b in BUDGETS}
    ours = comparison[comparison["recipe"] == "mixprec"]
    assert (ours["bpw"].to_numpy() <= np.array(BUDGETS) + 1e-9).all()


def _raise_summary(base_kl: float) -> MeasurementSummary:
    """The smallest summary.json of a raise-mode table whose base run had mean KL `base_kl`."""
    settings = {"mode": "raise", "granularity": "layer", "kinds": ["attention", "dense_mlp"], "method": "rtn",
                "group_size": 64, "symmetric": True, "clip_search": False, "base_bits": 2, "bits": [2, 4, 8],
                "measured_bits": [4, 8], "num_windows": 1, "seq_len": 8}
    data = {"source": "tiny", "split": "calibration", "seq_len": 8, "num_windows": 1, "num_tokens": 8, "sha256": "0"}
    return MeasurementSummary.from_dict({
        "schema_version": 1, "mixprec_version": "0", "model": {"path": "m", "fingerprint": "f", "model_type": "llama"},
        "variants": {}, "data": data, "settings": settings, "engine": None, "noise_floor": None,
        "base": {"summary": {"kl_mean": base_kl}}, "timing": {}, "counts": {}, "storage": "", "groups": {}},
        "summary.json")


def test_raise_mode_front_adds_the_base_kl(tmp_path: Path) -> None:
    """Raise-mode losses are ΔKL from the all-at-base model; the front must be base KL + ΣΔ, not ΣΔ."""
    rows = []
    for group, gains in (("layers.0.attn", (-3e-4, -4e-4)), ("layers.0.mlp", (-1e-4, -1.5e-4))):
        for bits, gain in zip((4, 8), gains, strict=True):
            rows.append({c: 0 for c in TABLE_COLUMNS} | {
                "group": group, "kind": "attention" if "attn" in group else "dense_mlp", "layer": 0, "params": 64,
                "mode": "raise", "base_bits": 2, "bits": bits, "storage_bits": 64 * bits, "delta_bits": 64 * (bits - 2),
                "dkl": gain, "dkl_se": 1e-5})
    front = additive_front(Measurement(tmp_path, pd.DataFrame(rows), _raise_summary(base_kl=1e-3)))
    assert front["predicted"].iloc[0] == pytest.approx(1e-3), "all groups at the base width predict the base KL"
    assert front["predicted"].iloc[-1] == pytest.approx(1e-3 - 4e-4 - 1.5e-4)
    assert front["bpw"].tolist()[0] == 2 and front["bpw"].tolist()[-1] == 8


def test_demo_summary_adds_compiled_checkpoints(work: Path) -> None:
    data = collect(work)
    assert tables.compiled_table(data).empty, "no demo_summary.json, no compiled section"
    data.demo = {"budgets": [{"budget": 3.0, "compiled": "c/3bpw", "compiled_mib": 1.25, "compiled_kl": 2e-4,
                              "compiled_kl_se": 1e-5, "comparison": {"mixprec": {"evaluation_kl": 1.9e-4,
                                                                                 "evaluation_se": 1e-5}}}]}
    row = tables.compiled_table(data).iloc[0]
    assert (row["budget"], row["size MiB"], row["compiled KL (held-out)"]) == ("3bpw", "1.25", "2.000e-04 ± 1.0e-05")
    assert row["search's held-out KL"] == "1.900e-04 ± 1.0e-05" and row["PPL ratio"] == "—"
    assert row["compiled"] == "3bpw"


def test_report_errors(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--work", str(empty)]) == 2
    assert "no finished measurement" in capsys.readouterr().err
    with pytest.raises(MixprecError, match="work folder .* does not exist"):
        collect(tmp_path / "nowhere")
    with pytest.raises(MixprecError, match="dpi"):
        build_report(work, dpi=5)
    with pytest.raises(MixprecError, match="work folder itself"):
        build_report(work, out_dir=work)


def test_attach_puts_figures_in_the_study_once(work: Path, report: Path) -> None:
    study = optuna.load_study(study_name="tiny-3bpw", storage=f"sqlite:///{work}/studies/tiny-3bpw.db")
    names = [m.filename for m in optuna.artifacts.get_all_artifact_meta(study)]
    assert {n.rsplit("-", 1)[0] for n in names} >= FIGURES | {"summary", "tiny-3bpw"}, "report not attached"
    assert attach_to_studies(collect(work), report) == len(BUDGETS)
    again = [m.filename for m in optuna.artifacts.get_all_artifact_meta(study)]
    assert again == names, "an unchanged report must not be uploaded twice"


def test_import_has_no_plotting_side_effects() -> None:
    code = ("import sys, mixprec.report, mixprec.report.dashboard, mixprec.cli; "
            "assert 'matplotlib' not in sys.modules and 'optuna_dashboard' not in sys.modules, 'eager import'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_report_never_follows_a_recipe_to_a_storage_elsewhere(work: Path, tmp_path: Path) -> None:
    """A recipe naming a study outside the work folder and --studies-dir (or a server) is left out, not written."""
    import yaml

    from mixprec.core.fileio import sha256_file
    from mixprec.report.collect import StudyAccess

    copy, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(work, copy)
    elsewhere.mkdir()
    foreign = elsewhere / "foreign.db"
    shutil.copyfile(work / "studies" / "tiny-3bpw.db", foreign)
    before = sha256_file(foreign)
    for name, storage in (("tiny-3bpw", f"sqlite:///{foreign}"), ("tiny-2.5bpw", "postgresql://u:p@127.0.0.1:9/x")):
        path = copy / "recipes" / f"{name}.yaml"
        data = yaml.safe_load(path.read_text())
        data["provenance"]["study"]["storage"] = storage
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    code = main(["report", "--work", str(copy), "--out", str(tmp_path / "r"), "--dpi", "50",
                 "--studies-dir", str(tmp_path / "none")])
    assert code == 0, "a recipe's foreign storage must be skipped, not connected to"
    assert [p.name for p in elsewhere.iterdir()] == ["foreign.db"], "nothing may be written next to it"
    assert sha256_file(foreign) == before
    allowed = collect(copy, access=StudyAccess((elsewhere,)))
    assert f"sqlite:///{foreign}" in {s.storage for s in allowed.studies}, "--studies-dir lets the user allow it"


def test_override_yaml_in_the_recipes_folder_is_left_out(work: Path, tmp_path: Path) -> None:
    """`search --export-exl3 WORK/recipes/x.exl3.yaml` puts an override YAML beside the recipes; report read it as
    a recipe and aborted."""
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    (copy / "recipes" / "tiny-3bpw.exl3.yaml").write_text("sources: [{id: q4, model_dir: /q/4}]\n"
                                                          "overrides: [{key: 'model.*', source: q4}]\n")
    data = collect(copy, studies=False)
    assert sorted(r.label for r in data.recipes) == sorted(r.label for r in collect(work, studies=False).recipes)
