"""Screening in the study (successive halving with two rungs) on a real tiny Qwen2-MoE.

A proposal is scored on a fraction of the engine's chunks of windows first and compared per sequence
with the incumbent: clearly worse ones stop there (pruned, costing that fraction), the others are
completed on the remaining chunks (exactly one full evaluation). Seeds are evaluated in full.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_screening.py -q
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mixprec.core.errors import MixprecError
from mixprec.measure.engine.core import EngineConfig, KLEngine
from mixprec.model.data import WindowConfig, windows_from_tokens
from mixprec.model.loading import Checkpoint, load_model
from mixprec.search.sampler import completed
from mixprec.search.solve import Solution, uniform
from mixprec.search.study import SearchConfig, SearchResult, run_search
from tests.test_search import Setup, recipe_of, sequence, setup  # noqa: F401  (setup: the shared fixture)

Pruned = TrialState.PRUNED


@pytest.fixture(scope="module")
def chunked(tiny_model_dirs: dict[str, Path], setup: Setup) -> KLEngine:  # noqa: F811
    """The search's engine on 16 windows in 4 chunks of 4 (screen=0.25 screens on 4 windows)."""
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    stream = torch.randint(3, 160, (16 * 32,), generator=torch.Generator().manual_seed(2))
    windows = windows_from_tokens(stream, WindowConfig(32, 16), "random", "calibration")
    return KLEngine(load_model(checkpoint), setup.engine.model_map, windows, setup.engine.variants, "cpu",
                    EngineConfig(batch_windows=4))


def screened_search(setup: Setup, engine: KLEngine, tmp: Path, seeds: list[Solution],  # noqa: F811
                    **overrides: object) -> tuple[SearchResult, optuna.Study]:
    config = SearchConfig(**{"trials": 10, "studies_dir": tmp / "studies", "study_name": "s", "screen": 0.25,
                             **overrides})
    result = run_search(setup.problem, setup.limit, lambda a, chunks=None: engine.evaluate(a, chunks).kl,
                        engine.num_sequences, seeds, config, recipe_for=lambda s: recipe_of(setup, s),
                        chunks=engine.chunk_sequences, spent=lambda: float(engine.token_layers))
    storage = config.storage or config.storage_url
    if not storage.startswith("sqlite"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    return result, optuna.load_study(study_name="s", storage=storage)


def proposal(setup: Setup, study: optuna.Study, solution: Solution, label: str) -> None:  # noqa: F811
    """Enqueue `solution` as a proposal of the search (a corrected-estimate DP point), which is screened."""
    picks = setup.problem.indices(solution.assignment)
    params = {n: picks[i] for i, n in enumerate(setup.problem.names) if len(setup.problem.options[i]) > 1}
    study.enqueue_trial(params, user_attrs={"seed": f"corrected-{label}"})


def test_clearly_worse_is_pruned_for_a_quarter_and_never_chosen(setup: Setup, chunked: KLEngine,  # noqa: F811
                                                                tmp_path: Path) -> None:
    dp = setup.seeds[0]
    result, study = screened_search(setup, chunked, tmp_path, [dp], trials=1)
    worst = uniform(setup.problem, 2)  # every group at 2 bits: far worse than the DP point
    proposal(setup, study, worst, "worst")
    proposal(setup, study, dp, "same")  # as good as the incumbent (paired difference exactly 0): completed
    chunked.clear_prefix_cache()  # costs below assume nothing of these recipes is cached (the engine is shared)
    before = chunked.token_layers
    result, study = screened_search(setup, chunked, tmp_path, [dp], trials=3)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, Pruned, TrialState.COMPLETE]
    screen = trials[1].user_attrs["screen"]
    assert screen["windows"] == 4 and screen["incumbent"] == 0
    assert screen["diff"] > 2 * screen["diff_se"] > 0, screen
    full = chunked.num_tokens * chunked.num_layers  # layer 0 changes, so every layer runs
    assert screen["token_layers"] == full / 4, "a pruned trial costs its screen only"
    assert trials[1].intermediate_values == {4: pytest.approx(screen["kl"])}
    assert trials[1].user_attrs["levels"] == list(setup.problem.indices(worst.assignment)), "kept: never re-proposed"
    assert trials[2].values[0] == trials[0].values[0] and trials[2].user_attrs["seq_kl"] == trials[0].user_attrs[
        "seq_kl"], "screen + rest must be exactly the full evaluation"
    assert trials[2].user_attrs["screen"]["diff"] == 0.0
    assert trials[2].user_attrs["metrics"]["token_layers"] == full, "a survivor costs one full evaluation"
    assert chunked.token_layers - before == full / 4 + full
    assert result.best.extra["trial"] in (0, 2) and [r["number"] for r in result.pruned] == [1]
    assert len(result.history) == 2, "the history holds completed trials; pruned ones are in `pruned`"


def test_a_better_proposal_survives_and_costs_one_full_evaluation(setup: Setup, chunked: KLEngine,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    dp, low = setup.seeds[0], uniform(setup.problem, 2)
    result, study = screened_search(setup, chunked, tmp_path, [low], trials=1)  # a poor incumbent
    proposal(setup, study, dp, "dp")
    chunked.clear_prefix_cache()
    result, study = screened_search(setup, chunked, tmp_path, [low], trials=2)
    survivor = study.trials[1]
    assert survivor.state == TrialState.COMPLETE and survivor.user_attrs["screen"]["diff"] < 0
    expected = chunked.evaluate(dp.assignment).kl.double()
    assert survivor.values[0] == float(expected.mean())
    assert survivor.user_attrs["metrics"]["token_layers"] == chunked.num_tokens * chunked.num_layers
    assert result.best.assignment == dp.assignment


def test_screened_study_prunes_never_reproposes_and_resumes_as_if_uninterrupted(
        setup: Setup, chunked: KLEngine, tmp_path: Path) -> None:  # noqa: F811
    whole, study = screened_search(setup, chunked, tmp_path / "whole", setup.seeds, trials=16)
    states = [t.state for t in study.trials]
    assert states.count(Pruned) >= 2, "some proposals should be pruned on this model"
    assert states.count(TrialState.COMPLETE) + states.count(Pruned) == 16, "`trials` counts pruned trials too"
    levels = [tuple(t.user_attrs["levels"]) for t in study.trials]
    assert len(set(levels)) == len(levels), "a pruned recipe must never be proposed again"
    assert all("seed" not in t.user_attrs or t.user_attrs["seed"].startswith("corrected-")
               for t in study.trials if t.state == Pruned), "seeds are evaluated in full"
    assert whole.best.extra["trial"] in {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    journal = str(tmp_path / "parts" / "study.log")
    screened_search(setup, chunked, tmp_path / "parts", setup.seeds, trials=8, storage=journal)
    resumed, _ = screened_search(setup, chunked, tmp_path / "parts", setup.seeds, trials=16, storage=journal)
    assert sequence(resumed) == sequence(whole)
    assert [(r["number"], r["diff"], r["diff_se"]) for r in resumed.pruned] == \
        [(r["number"], r["diff"], r["diff_se"]) for r in whole.pruned]
    assert resumed.best.assignment == whole.best.assignment


def test_pruned_trials_are_never_parents(setup: Setup, chunked: KLEngine, tmp_path: Path) -> None:  # noqa: F811
    _, study = screened_search(setup, chunked, tmp_path, setup.seeds, trials=14)
    parents = completed(study.trials)
    assert parents and all(t.state == TrialState.COMPLETE for t in parents)
    assert len(parents) < len([t for t in study.trials if "levels" in t.user_attrs]), "pruned trials are left out"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"screen": 1.5}, "screen=1.5 must be a fraction"),
    ({"screen": float("nan")}, "screen=nan must be a fraction"),
    ({"screen": 0.25, "screen_z": 0.0}, "screen_z=0.0 must be a positive"),
    ({"screen_z": float("inf")}, "screen_z=inf must be a positive"),
    ({"screen": 0.25, "multi_objective": True}, "needs the single-objective search"),
])
def test_screen_settings_are_checked_in_one_line(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(MixprecError, match=message) as error:
        SearchConfig(**overrides)  # type: ignore[arg-type]
    assert "\n" not in str(error.value)
    assert not SearchConfig(screen=1.0).screening and not SearchConfig(screen=0.0).screening


def test_chunks_must_cover_the_windows(setup: Setup, chunked: KLEngine, tmp_path: Path) -> None:  # noqa: F811
    config = SearchConfig(trials=1, studies_dir=tmp_path, screen=0.25)
    with pytest.raises(MixprecError, match="summing to the 16 calibration windows"):
        run_search(setup.problem, setup.limit, lambda a, chunks=None: chunked.evaluate(a, chunks).kl,
                   chunked.num_sequences, setup.seeds, config, chunks=(4, 4, 4))
