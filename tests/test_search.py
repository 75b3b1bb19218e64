"""The Optuna search on a real tiny Qwen2-MoE: budget, determinism, resume, artifacts, MO mode, the CLI.

Every trial is a real composed recipe evaluated by `KLEngine` on random-token windows; studies live
in SQLite or journal files under tmp dirs.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_search.py -q
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import save_file

from mixprec.cli import main
from mixprec.core.errors import FingerprintMismatchError, MixprecError
from mixprec.formats.exl3 import Exl3Overrides, exl3_to_groups, source_bits
from mixprec.formats.recipe import Budget, Recipe
from mixprec.measure.config import MeasureConfig
from mixprec.measure.engine.core import KLEngine
from mixprec.model.data import WindowConfig, windows_from_tokens
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantConfig, QuantSettings, storage_bits
from mixprec.quant.variants import ensure_variants
from mixprec.search.costs import Constraints, CostTable, budget_limit_bits
from mixprec.search.inputs import (
    StageConfig,
    baselines,
    measure_missing,
    nearest_uniform,
    prepare,
    seeds,
    uniform_grid,
)
from mixprec.search.moves import blocks, fill, lower_until_fits, mutate, repair, total_cost
from mixprec.search.pipeline import SMALLER_BUDGET, EngineCache, _calibration_windows, baseline_recipes, run_stage
from mixprec.search.solve import Problem, Solution, greedy, hq_at_budget, pareto_front, uniform
from mixprec.search.study import SearchConfig, run_search
from mixprec.search.sweep import neighbour_seeds, run_budgets
from tests.test_solve import random_problem

BITS = (2, 3, 4, 8)


@dataclass
class Setup:
    problem: Problem
    limit: int
    engine: KLEngine
    seeds: list[Solution]
    table: CostTable


@pytest.fixture(scope="module")
def setup(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Setup:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    model_map = checkpoint.model_map("fine")
    work = tmp_path_factory.mktemp("work")
    variants = {v.bits: v for v in ensure_variants(
        checkpoint, model_map, [QuantConfig(bits=b, clip_search=False) for b in BITS], work)}
    stream = torch.randint(3, 160, (8 * 32,), generator=torch.Generator().manual_seed(1))
    windows = windows_from_tokens(stream, WindowConfig(32, 8), "random", "calibration")
    engine = KLEngine(load_model(checkpoint), model_map, windows, variants, "cpu")
    table = CostTable.from_variants(model_map, variants)
    jobs = [(g, b) for g in table.names for b in BITS]
    results = engine.evaluate_many([{g: b} for g, b in jobs])
    losses: dict[str, dict[int | None, float]] = {}
    for (g, b), result in zip(jobs, results, strict=True):
        losses.setdefault(g, {})[b] = float(result.kl.double().mean())
    problem = Problem.build(table, Constraints().options(table), losses)
    limit = int(3.0 * table.params)
    seeds = [*pareto_front(problem).near(limit, 2), greedy(problem, limit), hq_at_budget(problem, limit),
             uniform(problem, 2)]
    return Setup(problem, limit, engine, seeds, table)


def search(setup: Setup, tmp: Path, **overrides: object) -> tuple[object, SearchConfig]:
    config = SearchConfig(**{"trials": 10, "studies_dir": tmp / "studies", "study_name": "s", **overrides})
    result = run_search(setup.problem, setup.limit, lambda a: setup.engine.evaluate(a).kl,
                        setup.engine.num_sequences, setup.seeds, config,
                        recipe_for=lambda s: recipe_of(setup, s))
    return result, config


def recipe_of(setup: Setup, solution: Solution) -> Recipe:
    from mixprec.formats.recipe import Budget, ModelRef

    return Recipe(ModelRef("tiny", "qwen2_moe", "f" * 64), setup.engine.model_map.granularity, QuantSettings(),
                  dict(solution.assignment), Budget(bpw=3.0), setup.table.achieved(solution.assignment),
                  {"solver": solution.solver}, {"predicted": solution.loss, **solution.extra})


def sequence(result: object) -> list[tuple[float, float]]:
    return [(row["bpw"], row["kl"]) for row in result.history]  # type: ignore[attr-defined]


def test_study_stays_in_budget_records_constraints_and_artifacts(setup: Setup, tmp_path: Path) -> None:
    result, config = search(setup, tmp_path, trials=12)
    study = optuna.load_study(study_name="s", storage=config.storage_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 12
    for trial in complete:
        assert trial.user_attrs["metrics"]["storage_bits"] <= setup.limit, f"trial {trial.number} exceeds the budget"
        assert trial.constraints["bpw_excess"] <= 0
        assert trial.user_attrs["metrics"]["storage_bits"] == setup.problem.cost(trial.user_attrs["assignment"])
    seeded = [t for t in complete if "seed" in t.user_attrs]
    assert {t.user_attrs["seed"] for t in seeded} >= {"dp", "hq", "uniform-2"}
    evaluated = [t.user_attrs["assignment"] for t in complete]
    assert all(seed.assignment in evaluated for seed in setup.seeds), "every seed (greedy too) is evaluated"
    assert result.best.extra["calibration"] <= min(t.values[0] for t in seeded), "the choice lost to a seed"
    assert result.best.cost <= setup.limit
    others = [t for t in complete if t.user_attrs["assignment"] != seeded[0].user_attrs["assignment"]]
    assert all(t.user_attrs["metrics"]["dkl_vs_ref_se"] > 0 for t in others), "paired SE must be recorded"
    files = list((tmp_path / "studies" / "artifacts").iterdir())
    assert len(files) == 12, "one recipe artifact per trial"
    recipes = [Recipe.from_yaml(f.read_text()) for f in files]
    assert {tuple(r.groups.values()) for r in recipes} == {tuple(t.user_attrs["assignment"].values())
                                                            for t in complete}


def test_same_seed_same_recipe(setup: Setup, tmp_path: Path) -> None:
    first, _ = search(setup, tmp_path / "a", seed=3)
    again, _ = search(setup, tmp_path / "b", seed=3)
    other, _ = search(setup, tmp_path / "c", seed=4)
    assert first.best.assignment == again.best.assignment  # type: ignore[attr-defined]
    assert sequence(first) == sequence(again)
    assert sequence(first) != sequence(other), "another seed should propose other recipes"


def test_interrupted_study_resumes_as_if_uninterrupted(setup: Setup, tmp_path: Path) -> None:
    whole, _ = search(setup, tmp_path / "whole", trials=12)
    journal = str(tmp_path / "parts" / "study.log")
    search(setup, tmp_path / "parts", trials=6, storage=journal)
    resumed, config = search(setup, tmp_path / "parts", trials=12, storage=journal)
    assert sequence(resumed) == sequence(whole)
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal)))
    labels = [t.user_attrs["seed"] for t in study.trials if "seed" in t.user_attrs]
    assert "hq" in labels and len(labels) == len(set(labels)), f"seeds must not be enqueued twice: {labels}"
    with pytest.raises(FingerprintMismatchError, match="new --study name"):
        run_search(setup.problem, setup.limit - 1000, lambda a: setup.engine.evaluate(a).kl,
                   setup.engine.num_sequences, setup.seeds[-1:], config)


def test_compact_trials_hold_no_parameters_and_resume_like_full_ones(setup: Setup, tmp_path: Path) -> None:
    """Past `compact_above` groups a trial keeps its recipe as one attribute: no Optuna parameter per group,
    every seed still evaluated, the budget kept, the same proposals as with parameters, and a resumed study
    equal to an uninterrupted one."""
    whole, config = search(setup, tmp_path / "whole", trials=12, compact_above=0, seed=5)
    study = optuna.load_study(study_name="s", storage=config.storage_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 12 and all(not t.params for t in complete), "compact trials suggest no parameters"
    evaluated = [t.user_attrs["assignment"] for t in complete]
    assert all(seed.assignment in evaluated for seed in setup.seeds), "every seed is evaluated"
    assert all(t.user_attrs["metrics"]["storage_bits"] <= setup.limit for t in complete)
    assert len({tuple(t.user_attrs["levels"]) for t in complete}) == 12, "the sampler proposes unseen recipes"
    assert sum("seed" not in t.user_attrs for t in complete) >= 3, "the sampler's own proposals are run"
    full, _ = search(setup, tmp_path / "full", trials=12, seed=5)
    assert sequence(whole) == sequence(full), "the same proposals as a study with one parameter per group"
    journal = str(tmp_path / "parts" / "study.log")
    search(setup, tmp_path / "parts", trials=7, storage=journal, compact_above=0, seed=5)
    resumed, _ = search(setup, tmp_path / "parts", trials=12, storage=journal, compact_above=0, seed=5)
    assert sequence(resumed) == sequence(whole)
    assert resumed.best.assignment == whole.best.assignment  # type: ignore[attr-defined]
    with pytest.raises(FingerprintMismatchError):  # a compact study is not resumed as a full one
        search(setup, tmp_path / "parts", trials=13, storage=journal, seed=5)


def test_killed_trials_are_recovered(setup: Setup, tmp_path: Path) -> None:
    calls = 0

    def dies_on_fifth(assignment: dict[str, int | None]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return setup.engine.evaluate(assignment).kl

    config = SearchConfig(trials=8, studies_dir=tmp_path, study_name="k")
    with pytest.raises(KeyboardInterrupt):
        run_search(setup.problem, setup.limit, dies_on_fifth, setup.engine.num_sequences, setup.seeds, config)
    study = optuna.load_study(study_name="k", storage=config.storage_url)
    orphan = study.ask()  # a trial left RUNNING by a process that no longer exists
    orphan.set_user_attr("owner", {"host": __import__("socket").gethostname(), "pid": 2**22 + 7, "start": "0"})
    result = run_search(setup.problem, setup.limit, lambda a: setup.engine.evaluate(a).kl,
                        setup.engine.num_sequences, setup.seeds, config)
    states = [t.state for t in optuna.load_study(study_name="k", storage=config.storage_url).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8
    assert states.count(optuna.trial.TrialState.RUNNING) == 0, "the orphan must be marked failed"
    assert states.count(optuna.trial.TrialState.FAIL) == 2
    assert len(result.history) == 8


def test_budget_blind_sampler_is_repaired(setup: Setup, tmp_path: Path) -> None:
    result, config = search(setup, tmp_path, sampler="random", trials=14)
    study = optuna.load_study(study_name="s", storage=config.storage_url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    excess = [t.user_attrs["metrics"]["raw_bpw_excess"] for t in trials]
    assert any(e > 0 for e in excess), "random proposals should overshoot sometimes"
    assert all(t.user_attrs["metrics"]["storage_bits"] <= setup.limit for t in trials)


def test_multi_objective_front(setup: Setup, tmp_path: Path) -> None:
    result, _ = search(setup, tmp_path, multi_objective=True, trials=12)
    front = result.pareto  # type: ignore[attr-defined]
    assert len(front) >= 2
    assert all(p["bpw"] <= 3.0 + 1e-9 for p in front)
    assert [p["bpw"] for p in front] == sorted(p["bpw"] for p in front)
    assert all(a["kl"] > b["kl"] for a, b in zip(front, front[1:], strict=False)), "front KL falls as bpw rises"


def _scan_pick(scored: list[tuple[float, int]], rng: random.Random | None, top: int) -> int:
    scored.sort()
    return scored[0][1] if rng is None or top <= 1 else scored[rng.randrange(min(top, len(scored)))][1]


def _scan_lower(problem: Problem, picks: list[int], limit: int, rng: random.Random | None, top: int) -> list[int]:
    """Reference for `lower_until_fits`: rescore every group at every step (what the heap must reproduce)."""
    picks = list(picks)
    while total_cost(problem, picks) > limit:
        costs, losses = problem.costs, problem.losses
        scored = [((losses[i][k - 1] - losses[i][k]) / max(costs[i][k] - costs[i][k - 1], 1), i)
                  for i, k in enumerate(picks) if k]
        picks[_scan_pick(scored, rng, top)] -= 1
    return picks


def _scan_fill(problem: Problem, picks: list[int], limit: int, rng: random.Random | None, top: int) -> list[int]:
    picks = list(picks)
    while True:
        cost, scored = total_cost(problem, picks), []
        for i, k in enumerate(picks):
            if k + 1 < len(problem.costs[i]):
                extra = problem.costs[i][k + 1] - problem.costs[i][k]
                gain = problem.losses[i][k] - problem.losses[i][k + 1]
                if cost + extra <= limit and gain > 0:
                    scored.append((-gain / max(extra, 1), i))
        if not scored:
            return picks
        picks[_scan_pick(scored, rng, top)] += 1


def test_heap_moves_pick_what_a_full_scan_picks() -> None:
    """`fill` and `lower_until_fits` keep candidates in a heap (30,000 groups took 0.3 s a step as a scan);
    with and without exploration they make exactly the choices of rescoring every group each step."""
    rng = random.Random(17)
    for trial in range(150):
        problem = random_problem(rng, rng.randint(2, 14), 6, costly=True)
        lo, hi = total_cost(problem, [0] * len(problem.names)), total_cost(problem, [len(c) - 1 for c in problem.costs])
        limit, picks = rng.randint(lo, hi), [rng.randrange(len(c)) for c in problem.costs]
        for top in (1, 3):
            a, b = random.Random(trial), random.Random(trial)
            lowered = lower_until_fits(problem, picks, limit, a, top)
            assert lowered == _scan_lower(problem, picks, limit, b, top)
            assert fill(problem, lowered, limit, a, top) == _scan_fill(problem, lowered, limit, b, top)
            assert a.random() == b.random(), "the same random draws"


def test_moves_never_leave_the_budget() -> None:
    rng = random.Random(11)
    for _ in range(100):
        problem = random_problem(rng, rng.randint(2, 8), 6, costly=True)
        lo = total_cost(problem, [0] * len(problem.names))
        hi = total_cost(problem, [len(c) - 1 for c in problem.costs])
        limit = rng.randint(lo, hi)
        start = [rng.randrange(len(c)) for c in problem.costs]
        fixed = repair(problem, start, limit)
        assert total_cost(problem, fixed) <= limit
        assert fill(problem, fixed, limit) == fixed, "repair leaves no improving raise that fits"
        child = mutate(problem, fixed, limit, rng, moves=3, units=blocks(problem))
        assert total_cost(problem, child) <= limit


def _bundle_splits(folder: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for split in ("calibration", "evaluation"):
        tokens = torch.randint(3, 160, (2048,), generator=generator, dtype=torch.int32)
        save_file({"tokens": tokens}, folder / f"{split}.safetensors")


def _tiny_model(tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny Qwen2-MoE with bundled data splits; the test runs inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dirs["qwen2_moe"], model)
    _bundle_splits(model)
    return model


def mixprec(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process; returns (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_search_end_to_end(tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    common = [str(model), "--work", str(tmp_path / "work"), "--bits", "2", "3", "4", "--windows", "4",
              "--seq-len", "32", "--eval-windows", "4", "--studies-dir", str(tmp_path / "studies"), "--options"]
    code, _, err = mixprec("search", *common, "--budget", "1.5", capsys=capsys)
    assert code == 2 and "between" in err and "bpw" in err, err
    assert not (tmp_path / "work" / "measure").exists(), "an infeasible budget must fail before measuring"
    code, _, err = mixprec("search", *common, "--budget", "3", "--floor", "atention=4", capsys=capsys)
    assert code == 2 and "nearest: attention" in err, err
    code, _, err = mixprec("search", *common, "--budget", "3", "--no-measure", capsys=capsys)
    assert code == 2 and "holds no finished measurement" in err, err
    code, _, err = mixprec("search", *common, "--budget", "3", "--export-exl3", "x.yaml", "--exl3-source", "4",
                           capsys=capsys)
    assert code == 2 and "--exl3-source" in err, err
    assert not (tmp_path / "work" / "measure").exists(), "bad flags must fail before the explicit measure step"
    out, exl3 = tmp_path / "r.yaml", tmp_path / "exl3.yaml"
    code, stdout, err = mixprec("search", *common, "--budget", "3", "--trials", "6", "--floor", "attention=3",
                                "--out", str(out), "--export-exl3", str(exl3), capsys=capsys)
    assert code == 0, err
    for name in ("mixprec", "greedy", "hq", "uniform"):
        assert f"\n{name} " in stdout, stdout
    recipe = Recipe.load(out)
    checkpoint = Checkpoint.open(model)
    recipe.check_model(checkpoint.model_map("fine"), checkpoint.fingerprint)
    assert recipe.achieved["bpw"] <= 3.0 and recipe.achieved["storage_bits"] <= 3 * recipe.achieved["params"]
    assert all(bits >= 3 for name, bits in recipe.groups.items() if ".attn." in name), "floor ignored"
    assert {"predicted", "calibration", "evaluation", "evaluation_se"} <= set(recipe.kl)
    assert recipe.provenance["evaluation"]["split"] == "evaluation"
    overrides = Exl3Overrides.load(exl3)
    assert all(Path(s.model_dir).is_absolute() for s in overrides.sources), "compiling from elsewhere must work"
    bits_of_dir = {s.model_dir: source_bits(s.model_dir) for s in overrides.sources}
    assert exl3_to_groups(overrides, checkpoint.model_map("fine"), bits_of_dir, base_bits=-1) == recipe.groups
    moved = model.rename(tmp_path / "renamed-model")  # its measurement is tied to content, not the folder name
    config = StageConfig(work=tmp_path / "work", budget=Budget(bpw=3.0), model=str(moved), granularity="fine",
                         measure=MeasureConfig(work=tmp_path / "work", model=str(moved), bits=(2, 3, 4),
                                               granularity="fine", num_windows=4, seq_len=32))
    assert _calibration_windows(prepare(config)).spec.sha256 == _table_data_sha(tmp_path / "work")


def _table_data_sha(work: Path) -> str:
    return json.loads((work / "measure" / "drop-fine" / "summary.json").read_text())["data"]["sha256"]


def test_concordance() -> None:
    from mixprec.search.sampler import _concordance

    assert _concordance([1, 2, 3], [10, 20, 30]) == 1.0
    assert _concordance([1, 2, 3], [30, 20, 10]) == -1.0
    assert _concordance([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert _concordance([1], [1]) == 0.0


@pytest.mark.slow
def test_other_tables_seed_the_study(tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A raise-mode table beside the drop-mode one contributes its DP/greedy solutions as seeds."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    data = [str(model), "--work", str(tmp_path / "work"), "--bits", "2", "3", "4", "--windows", "4",
            "--seq-len", "32"]
    code, _, err = mixprec("measure", *data, "--granularity", "fine", "--mode", "raise", capsys=capsys)
    assert code == 0, err
    code, _, err = mixprec("search", *data, "--eval-windows", "4", "--studies-dir", str(tmp_path / "studies"),
                           "--budget", "3", "--trials", "1", "--study", "t", capsys=capsys)
    assert code == 0, err
    config = StageConfig(work=tmp_path / "work", budget=Budget(bpw=3.0), model=str(model), granularity="fine",
                         measure=MeasureConfig(work=tmp_path / "work", model=str(model), bits=(2, 3, 4),
                                               granularity="fine", num_windows=4, seq_len=32))
    inputs = prepare(config)
    assert list(inputs.others) == ["raise-b2-fine"]
    labels = [s.solver for s in seeds(inputs, baselines(inputs), 2)]
    assert any(label.startswith("raise-b2-fine:") for label in labels), labels
    assert all(s.cost <= inputs.limit_bits for s in seeds(inputs, baselines(inputs), 2))
    assert not any("-above-" in label for label in labels), "nothing above 2 bits fits 3.0 bpw at g64"
    narrow = dataclasses.replace(config, measure=dataclasses.replace(config.measure, bits=(2, 4)))
    assert {o for opts in prepare(narrow).problem.options for o in opts} <= {2, 4, None}, "only the asked widths"
    roomy = dataclasses.replace(inputs, limit_bits=int(inputs.limit_bits * 4.4 / 3.0))
    roomy_seeds = seeds(roomy, baselines(roomy), 2)
    assert [s.solver for s in roomy_seeds[1:3]] == ["dp-above-2b", "greedy-above-2b"], "tried first, after the DP"
    above = {s.solver: s for s in roomy_seeds if "-above-" in s.solver}
    assert set(above) == {"dp-above-2b", "greedy-above-2b"}, "the study also starts from recipes avoiding 2 bits"
    for solution in above.values():
        assert solution.cost <= roomy.limit_bits and 2 not in solution.assignment.values()
        assert solution.cost > 0.9 * roomy.limit_bits, "and they spend the budget"


@pytest.mark.slow
def test_uniform_baseline_is_the_nearest_quant_over_widths_and_group_sizes(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The uniform baseline is the cheapest uniform quant at or above the budget over every width and group
    size, with exact costs (so e.g. 2-bit g32 is chosen over 3-bit g64 when it reaches the budget)."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    measure = MeasureConfig(work=tmp_path / "work", model=str(model), bits=(2, 3, 4), granularity="layer",
                            num_windows=4, seq_len=32)
    config = StageConfig(work=tmp_path / "work", budget=Budget(bpw=2.5), model=str(model), granularity="layer",
                         measure=measure)
    with pytest.raises(MixprecError, match="holds no finished measurement"):
        prepare(config)  # loading never measures: that is the explicit step below
    measure_missing(config)
    inputs = prepare(config)
    grid = uniform_grid(inputs, (32, 64, 128))
    groups = [inputs.model_map.group(n) for n in inputs.table.names]
    assert {(u.config.bits, u.config.group_size) for u in grid} == {(b, g) for b in (2, 3, 4) for g in (32, 64, 128)}
    for u in grid:
        assert u.cost == sum(storage_bits(u.config, r.shape) for g in groups for r in g.weights)
        assert u.config.clip_search is False and u.config.method == "rtn"
    assert [u.cost for u in grid] == sorted(u.cost for u in grid)
    for limit in (grid[0].cost - 1, grid[0].cost, grid[3].cost - 1, grid[-1].cost, grid[-1].cost + 1):
        chosen = nearest_uniform(grid, limit)
        reaching = [u.cost for u in grid if u.cost >= limit]
        assert chosen.cost == (min(reaching) if reaching else grid[-1].cost)
    two_bit_g32 = next(u for u in grid if (u.config.bits, u.config.group_size) == (2, 32))
    assert nearest_uniform(grid, two_bit_g32.cost).config == two_bit_g32.config
    assert nearest_uniform(uniform_grid(inputs, (64,)), two_bit_g32.cost).config.bits == 3
    other = StageConfig(work=tmp_path / "work", budget=Budget(bpw=2.5), model=str(model), granularity="layer",
                        measure=replace(measure, num_windows=8))
    with pytest.raises(FingerprintMismatchError, match="num_windows=4 there, 8 asked"):
        prepare(other)
    wider = replace(config, measure=replace(measure, bits=(2, 3, 4, 5)))
    measure_missing(wider)  # a finished table lacking an asked width is extended, not read as it is
    assert sorted(prepare(wider).variants) == [2, 3, 4, 5]
    recipes = baseline_recipes(inputs, config)
    expected = baselines(inputs)
    assert set(recipes) == set(expected) and {"dp", "greedy", "hq"} <= set(recipes)
    for name, recipe in recipes.items():
        assert recipe.groups == expected[name].assignment and recipe.achieved["storage_bits"] == expected[name].cost
        assert recipe.granularity == "layer" and Recipe.from_yaml(recipe.to_yaml()).groups == recipe.groups
    assert replace(measure, quant=QuantSettings(group_size=128)).folder.name == "drop-layer-g128", \
        "other settings get their own table"
    assert replace(measure, quant=QuantSettings(method="gptq", clip_search=True)).folder.name == "drop-layer-gptq-clip"


@pytest.mark.slow
def test_a_uniform_quant_within_the_budget_that_beats_the_search_is_shipped(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Searching only 2-bit g64 at exactly the size of uniform 2-bit g32: the study can only return uniform
    g64, the finer-grouped uniform quant fits the budget and is better, so the stage ships it (FIELD.md §3)."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    measure = MeasureConfig(work=tmp_path / "work", model=str(model), bits=(2,), granularity="layer",
                            num_windows=4, seq_len=32)
    probe = StageConfig(work=tmp_path / "work", budget=Budget(bpw=4.0), model=str(model), granularity="layer",
                        measure=measure)
    measure_missing(probe)
    inputs = prepare(probe)
    g32 = next(u for u in uniform_grid(inputs, (32,)) if u.config.group_size == 32)
    budget = Budget(bpw=math.ceil(g32.cost / inputs.table.params * 1e6) / 1e6)
    config = StageConfig(work=tmp_path / "work", budget=budget, model=str(model), granularity="layer",
                         measure=measure, eval_windows=4, eval_seq_len=32,
                         search=SearchConfig(trials=2, studies_dir=tmp_path / "studies", study_name="guard"))
    result = run_stage(config)
    rows = {r["recipe"]: r for r in result.comparison}
    assert rows["uniform"]["solver"] == "uniform-2b-g32" and rows["uniform"]["predicted"] is None
    assert rows["uniform"]["calibration_kl"] < rows["mixprec"]["calibration_kl"]
    recipe = result.recipe
    assert recipe.quantizer.group_size == 32 and set(recipe.groups.values()) == {2}
    assert recipe.achieved["storage_bits"] == g32.cost <= budget_limit_bits(budget, inputs.table)
    assert recipe.kl["calibration"] == rows["uniform"]["calibration_kl"]
    assert "uniform-2b-g32" in recipe.provenance["solver"]
    assert recipe.provenance["variants"]["2"]["variant_id"] == "rtn-b2-g32-sym"


@pytest.mark.slow
def test_cli_search_over_group_sizes_ships_the_better_one(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--group-size 64 32`: one measurement (in its own folder) and one study per group size; the recipe with
    the lower calibration KL is shipped and the other joins the held-out table as mixprec-g<size>."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    out, exl3 = tmp_path / "r.yaml", tmp_path / "exl3.yaml"
    code, stdout, err = mixprec("search", str(model), "--work", str(tmp_path / "work"), "--bits", "2", "3", "4",
                                "--windows", "4", "--seq-len", "32", "--eval-windows", "4", "--granularity",
                                "layer", "--studies-dir", str(tmp_path / "studies"), "--budget", "3.2", "--trials",
                                "3", "--group-size", "64", "32", "--out", str(out), "--export-exl3", str(exl3),
                                capsys=capsys)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "work" / "measure").iterdir()} == {"drop-layer", "drop-layer-g32"}
    recipe = Recipe.load(out)
    other = 32 if recipe.quantizer.group_size == 64 else 64
    rows = {r["recipe"]: r for r in recipe.provenance["comparison"]}
    assert f"\nmixprec-g{other} " in stdout, stdout
    assert rows["mixprec"]["calibration_kl"] <= rows[f"mixprec-g{other}"]["calibration_kl"]
    assert recipe.achieved["bpw"] <= 3.2 and rows[f"mixprec-g{other}"]["bpw"] <= 3.2
    assert recipe.kl["calibration"] == rows["mixprec"]["calibration_kl"]
    studies = {p.name for p in (tmp_path / "studies").glob("*.db")}
    assert studies == {"tiny-layer-3.2bpw-s0-g64.db", "tiny-layer-3.2bpw-s0-g32.db"}, studies
    sizes = {source_bits(s.model_dir): s.model_dir for s in Exl3Overrides.load(exl3).sources}
    assert all(f"-g{recipe.quantizer.group_size}-" in d for d in sizes.values()), sizes


def test_neighbour_seeds_fit_and_use_the_budget() -> None:
    rng = random.Random(3)
    for _ in range(50):
        problem = random_problem(rng, rng.randint(2, 8), 6, costly=True)
        lo = total_cost(problem, [0] * len(problem.names))
        hi = total_cost(problem, [len(c) - 1 for c in problem.costs])
        small, large = sorted(rng.randint(lo, hi) for _ in range(2))
        recipe = problem.assignment(repair(problem, [0] * len(problem.names), small))
        up = neighbour_seeds(problem, large, "smaller-budget", recipe)
        assert up[0].assignment == recipe and up[0].solver == "smaller-budget", "a smaller recipe fits as is"
        assert all(s.cost <= large for s in up)
        assert up[-1].assignment == problem.assignment(repair(problem, problem.indices(recipe), large))
        down = neighbour_seeds(problem, small, "larger-budget", pareto_front(problem).best_under(large).assignment)
        assert down and all(s.cost <= small for s in down)
    assert neighbour_seeds(problem, hi, "other", {n: 7 for n in problem.names}) == [], "unknown widths are skipped"


@pytest.mark.slow
def test_budget_sweep_is_consistent_and_never_loses_to_a_fitting_uniform(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_budgets`: the shipped calibration KL never rises with the budget, the smaller budget's recipe is a
    candidate (and a seed) of the larger one, no shipped recipe loses to a uniform quant that fits, the
    decision's paired SE and the equivalent-uniform gain are reported."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    measure = MeasureConfig(work=tmp_path / "work", model=str(model), bits=(2, 3, 4), granularity="layer",
                            num_windows=4, seq_len=32)

    def config(bpw: float) -> StageConfig:
        search = SearchConfig(trials=7, studies_dir=tmp_path / "studies", study_name=f"sweep-{bpw}",
                              correct_after=3)
        return StageConfig(work=tmp_path / "work", budget=Budget(bpw=bpw), model=str(model), granularity="layer",
                           measure=measure, eval_windows=4, eval_seq_len=32, search=search, gain_curve=True,
                           uniform_group_sizes=(64, 128))

    budgets = [3.4, 2.6, 3.0]
    measure_missing(config(3.0))
    results = run_budgets([config(b) for b in budgets])
    by_budget = sorted(zip(budgets, results, strict=True))
    shipped = [r.recipe.kl["calibration"] for _, r in by_budget]
    assert shipped == sorted(shipped, reverse=True), f"more bits got worse on calibration data: {shipped}"
    for budget, result in by_budget:
        rows = {r["recipe"]: r for r in result.comparison}
        assert result.recipe.achieved["bpw"] <= budget
        fitting = [r for n, r in rows.items() if n.startswith("uniform") and r["bpw"] <= budget]
        assert all(result.recipe.kl["calibration"] <= r["calibration_kl"] for r in fitting), rows
        assert {"gain", "equivalent_bpw", "gain_se"} <= set(rows["mixprec"]), rows["mixprec"]
        assert rows["uniform"]["gain"] == pytest.approx(0.0, abs=0.05) or rows["uniform"]["extrapolated"]
        assert result.cost["study_token_layers"] > 0
        assert "decision_se" in result.search.best.extra
        study = optuna.load_study(study_name=f"sweep-{budget}", storage=result.search.storage_url)
        evaluated = [t.user_attrs["assignment"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
        inputs = prepare(config(budget))
        for other, label in ((budget - 0.4, "smaller-budget"), (budget + 0.4, "larger-budget")):
            if round(other, 1) in budgets:
                neighbour = next(r for b, r in by_budget if b == round(other, 1)).search.best.assignment
                moved = neighbour_seeds(inputs.problem, inputs.limit_bits, label, neighbour)
                assert moved and all(s.assignment in evaluated for s in moved), f"{label} recipe not tried at {budget}"
        assert (SMALLER_BUDGET in rows) == (budget != 2.6)
    assert results[0].curve is results[1].curve, "the uniform curve is measured once per sweep"


def test_exl3_sources_are_written_as_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cwd-relative model_dir in the override YAML broke compiling it from any other folder."""
    from mixprec.cli.search_cmd import _exl3_sources

    monkeypatch.chdir(tmp_path)
    assert _exl3_sources(["4=quants/4bpw"]) == {4: str(tmp_path / "quants" / "4bpw")}


@pytest.mark.slow
def test_cli_search_over_several_budgets_writes_one_recipe_each(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--budget 2.6 3.2 --gain --out DIR`: one linked sweep, one recipe per budget in DIR, gain column printed,
    the larger budget's recipe no worse on calibration data."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    out = tmp_path / "recipes"
    code, stdout, err = mixprec("search", str(model), "--work", str(tmp_path / "work"), "--bits", "2", "3", "4",
                                "--windows", "4", "--seq-len", "32", "--eval-windows", "4", "--granularity",
                                "layer", "--studies-dir", str(tmp_path / "studies"), "--budget", "3.2", "2.6",
                                "--trials", "3", "--gain", "--uniform-group-sizes", "64", "--out", str(out),
                                capsys=capsys)
    assert code == 0, err
    small, large = Recipe.load(out / "tiny-2.6bpw.yaml"), Recipe.load(out / "tiny-3.2bpw.yaml")
    assert small.achieved["bpw"] <= 2.6 and large.achieved["bpw"] <= 3.2
    assert large.kl["calibration"] <= small.kl["calibration"]
    assert "gain" in stdout and "smaller-budget" in stdout, stdout
    code, _, err = mixprec("search", str(model), "--budget", "3", "3.2", "--group-size", "64", "32", "--seq-len", "32",
                           capsys=capsys)
    assert code == 2 and "one group size" in err, err


@pytest.mark.slow
def test_select_between_compares_recipes_on_windows_the_table_never_saw(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--select between`: the study and the shipping choice score recipes on the windows halfway between the
    measurement's; the recipe records them, and its calibration KL is the KL on exactly those windows."""
    from mixprec.model.data import BETWEEN_SUFFIX, load_windows

    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    out = tmp_path / "r.yaml"
    code, _, err = mixprec("search", str(model), "--work", str(tmp_path / "work"), "--bits", "2", "3", "4",
                           "--windows", "4", "--seq-len", "32", "--eval-windows", "4", "--studies-dir",
                           str(tmp_path / "studies"), "--budget", "3", "--trials", "4", "--select", "between",
                           "--granularity", "fine", "--options", "--out", str(out), capsys=capsys)
    assert code == 0, err
    recipe = Recipe.load(out)
    calibration = recipe.provenance["calibration"]
    assert calibration["source"].endswith(BETWEEN_SUFFIX) and calibration["num_windows"] == 3
    measured = json.loads((tmp_path / "work" / "measure" / "drop-fine" / "summary.json").read_text())["data"]
    assert calibration["sha256"] != measured["sha256"]
    between = load_windows(model, "calibration", WindowConfig(32, 4), between=True)
    assert calibration["sha256"] == between.spec.sha256
    assert [p.name for p in (tmp_path / "studies").glob("*.db")] == ["tiny-fine-3.0bpw-s0-between.db"]
    checkpoint = Checkpoint.open(model)
    config = StageConfig(work=tmp_path / "work", budget=Budget(bpw=3.0), model=str(model), granularity="fine",
                         measure=MeasureConfig(work=tmp_path / "work", model=str(model), bits=(2, 3, 4),
                                               granularity="fine", num_windows=4, seq_len=32))
    inputs = prepare(config)
    engine = EngineCache().get(inputs, between, "cpu")
    kl = engine.evaluate(recipe.widths()).kl.double().mean()
    assert float(kl) == pytest.approx(recipe.kl["calibration"], rel=1e-6)
    assert checkpoint.fingerprint == recipe.model.fingerprint


def test_select_mode_is_checked() -> None:
    with pytest.raises(MixprecError, match="select='other' is unknown"):
        StageConfig(work=Path("w"), budget=Budget(bpw=3.0), select="other")


@pytest.mark.slow
def test_select_auto_falls_back_to_the_measurement_windows_on_short_text(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """3,000 calibration tokens hold 93 windows of 32: 50 measured leave no room for 49 between them, so the
    default (`auto`) compares recipes on the measurement's windows and `--select between` refuses in one line."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    common = [str(model), "--work", str(tmp_path / "work"), "--bits", "2", "4", "--windows", "50", "--seq-len", "32",
              "--eval-windows", "4", "--studies-dir", str(tmp_path / "studies"), "--budget", "3", "--trials", "2"]
    code, _, err = mixprec("search", *common, "--select", "between", "--out", str(tmp_path / "b.yaml"), capsys=capsys)
    assert code == 2 and "too few" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "work" / "measure").exists(), "refused before measuring"
    out = tmp_path / "r.yaml"
    code, _, err = mixprec("search", *common, "--out", str(out), capsys=capsys)
    assert code == 0, err
    measured = json.loads((tmp_path / "work" / "measure" / "drop-fine" / "summary.json").read_text())["data"]
    assert Recipe.load(out).provenance["calibration"]["sha256"] == measured["sha256"]
