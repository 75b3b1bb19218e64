"""The Optuna study over composed recipes: seeded with proxy solutions, refined on real KL.

Blind search does not work here: plain TPE with 2,000 trials on the additive estimate lost to
greedy, and 40 real-KL TPE trials were 35x worse than greedy (FIELD.md §7.5, §9.7). So the study
is seeded (`enqueue_trial`) with the exact DP solutions nearest the budget, exllamav3's greedy, the
`--hq` rule and the largest uniform recipe that fits, and then explores with `LocalMoveSampler`:
children of the best measured recipes made by budget-preserving moves (`mixprec.search.moves`). Every
trial is a composed recipe measured for real (`evaluate` -> per-token KL on the calibration
windows), compared *paired* with the reference seed on the same tokens, which gives a standard
error of the difference far smaller than either KL's own.

Screening (`SearchConfig.screen`, successive halving with two rungs): candidates differ by less than
the calibration noise, so most of a full evaluation is spent confirming that a proposal is worse. With
`screen=0.25` a proposal of the search (the sampler's, or a DP solution of the corrected estimate) is
first scored on the first quarter of the engine's chunks of windows and compared per sequence with the
incumbent (the best completed trial) on the same windows. Worse by more than `screen_z` paired standard
errors: it stops there (Optuna `TrialPruned`, its screening KL, paired difference ± SE and cost kept as
the `screen` user attr and its intermediate value) and never becomes the chosen recipe; otherwise the
remaining chunks run and the two parts are concatenated, so a survivor costs exactly one full
evaluation and is recorded as if screening were off. Seeds (the DP points, greedy, `--hq`, uniform,
neighbouring budgets' recipes) are always evaluated in full: they are few, the first is every trial's
paired reference, the uniform ones are the guard of `_choose`, and they make the incumbent.
`trials` then counts completed and pruned trials: the same number of candidates for fewer tokens.

Conventions (FIELD.md §7, STYLE.md §3.8):
* one parameter per searchable group, an integer level index into its allowed widths;
* the budget is met by construction (moves, and `repair` for proposals that ignore it) and recorded
  with `trial.set_constraint("bpw_excess", bpw - budget)`; the unrepaired excess is a user attr;
* storage `sqlite:///studies/<study>.db` by default, any Optuna storage URL (or a `.log` journal
  file path) otherwise; a study resumes with `load_if_exists=True`, and the sampler draws every
  proposal from the study's history and a seed per trial number, so an interrupted study that is
  resumed proposes exactly what an uninterrupted one would;
* each trial's recipe YAML is attached as an artifact (`studies/artifacts/`) for the dashboard;
* the single-budget mode minimises KL; the multi-objective mode minimises (KL, bpw) under the
  budget as a cap and returns the Pareto front.

All Optuna calls of the search live in this module and its sampler, `mixprec.search.sampler`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mixprec.core.errors import FingerprintMismatchError, MixprecError
from mixprec.core.fileio import sha256_text
from mixprec.core.kl import bootstrap_se, paired_difference
from mixprec.core.progress import progress
from mixprec.core.storage import open_storage
from mixprec.core.storage_url import check_storage, describe_open_error
from mixprec.formats.recipe import Recipe
from mixprec.measure.store import owner_is_dead, process_owner
from mixprec.search.correct import fit
from mixprec.search.costs import Option
from mixprec.search.moves import repair, total_cost
from mixprec.search.sampler import LocalMoveSampler, feasible
from mixprec.search.solve import Problem, Solution, pareto_front

__all__ = ["SAMPLERS", "SearchConfig", "SearchResult", "LocalMoveSampler", "run_search", "quiet_optuna"]

log = logging.getLogger(__name__)

SAMPLERS = ("local", "tpe", "random")
_STUDY_ATTR = "mixprec_search"

#: Seeds whose label starts so are proposals of the search (the corrected estimate's DP points): screened.
_SCREENED_SEEDS = ("corrected-",)
#: Trial states that count towards `SearchConfig.trials`.
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class Evaluator(Protocol):
    """Per-token KL of an assignment on the calibration windows, or on the chunks `chunks` of them only (e.g.
    `lambda a, chunks=None: engine.evaluate(a, chunks).kl`); without screening it is called with one argument."""

    def __call__(self, assignment: Mapping[str, Option], chunks: range | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class SearchConfig:
    """How the study runs.

    `trials` counts the study's completed and pruned trials, seeds included. `screen` is the fraction of the
    evaluator's chunks of windows a proposal is screened on first (0 or 1: off; rounded to whole chunks, at
    least one and one fewer than all); a screened proposal worse than the incumbent by more than `screen_z`
    paired standard errors is pruned. Screening needs the single-objective mode (one incumbent).
    """

    trials: int = 40
    seed: int = 0
    study_name: str = "mixprec-search"
    storage: str | None = None
    studies_dir: Path = Path("studies")
    sampler: str = "local"
    multi_objective: bool = False
    front_seeds: int = 4
    max_moves: int = 3
    explore_top: int = 3
    artifacts: bool = True
    correct: bool = True
    correct_after: int = 6
    screen: float = 0.0
    screen_z: float = 2.0
    #: Above this many groups (with the local sampler) a trial keeps its recipe as one attribute instead of one
    #: Optuna parameter per group: every parameter is one storage write (~2 ms on SQLite, a round trip on a
    #: server), 60 s per trial at the 30,000 groups of a width per expert and projection of DeepSeek-V3.
    compact_above: int = 512

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise MixprecError(f"trials={self.trials} must be at least 1")
        if not 0.0 <= self.screen <= 1.0:  # NaN fails too
            raise MixprecError(f"screen={self.screen} must be a fraction of the windows in [0, 1] (0 or 1: off)")
        if not (math.isfinite(self.screen_z) and self.screen_z > 0):
            raise MixprecError(f"screen_z={self.screen_z} must be a positive number of standard errors, e.g. 2")
        if self.screening and self.multi_objective:
            raise MixprecError(f"screen={self.screen} needs the single-objective search; drop --screen or "
                               "--multi-objective")
        if self.sampler not in SAMPLERS:
            raise MixprecError(f"sampler {self.sampler!r} is unknown; use one of {SAMPLERS}")
        if self.correct_after < 3:
            raise MixprecError(f"correct_after={self.correct_after} must be at least 3 (the fit needs three recipes)")
        if self.compact_above < 0:
            raise MixprecError(f"compact_above={self.compact_above} must be a number of groups, 0 or more")
        if min(self.front_seeds, self.max_moves, self.explore_top) < 1:
            raise MixprecError("front_seeds, max_moves and explore_top must be at least 1")
        if not self.study_name or "/" in self.study_name:
            raise MixprecError(f"study name {self.study_name!r} must be non-empty and contain no '/'")
        if self.storage is not None:
            check_storage(self.storage)

    @property
    def screening(self) -> bool:
        return 0.0 < self.screen < 1.0

    def compact(self, problem: Problem) -> bool:
        """Whether trials of `problem` keep their recipe as one attribute (no per-group Optuna parameters)."""
        return self.sampler == "local" and len(problem.names) > self.compact_above

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.studies_dir) / (self.study_name + '.db')}"


@dataclass
class SearchResult:
    """The chosen recipe (with its calibration KL), every completed trial's summary, the screening of every
    pruned one and, in MO mode, the Pareto front."""

    best: Solution
    history: list[dict[str, Any]]
    study_name: str
    storage_url: str
    pareto: list[dict[str, Any]] = field(default_factory=list)
    correction: dict[str, Any] = field(default_factory=dict)
    waiting: int = 0
    pruned: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Windows:
    """The evaluator's chunks of calibration windows (windows per chunk), how many of them a screen runs (0: no
    screening) and the evaluator's cost counter (token-layers so far; None: not reported)."""

    chunks: tuple[int, ...]
    screened: int
    spent: Callable[[], float] | None = None

    @classmethod
    def of(cls, config: SearchConfig, num_sequences: int, chunks: Sequence[int],
           spent: Callable[[], float] | None) -> _Windows:
        chunks = tuple(chunks) or (num_sequences,)
        if sum(chunks) != num_sequences or min(chunks) < 1:
            raise MixprecError(f"chunks {chunks} must be positive window counts summing to the {num_sequences} "
                               "calibration windows (the engine's chunk_sequences)")
        if config.screening and len(chunks) < 2:
            log.warning("screen=%g needs at least two chunks of windows, the evaluator has one; every trial is "
                        "evaluated in full", config.screen)
        screened = min(max(round(config.screen * len(chunks)), 1), len(chunks) - 1) if config.screening else 0
        return cls(chunks, screened, spent)

    def mark(self) -> float | None:
        return None if self.spent is None else self.spent()

    def since(self, mark: float | None) -> dict[str, float]:
        """`{"token_layers": spent since mark}`, or nothing when the evaluator reports no cost."""
        return {} if mark is None or self.spent is None else {"token_layers": float(self.spent() - mark)}


def _screens(trial: optuna.Trial) -> bool:
    """A proposal of the search (screened when screening is on), not a seed (always evaluated in full)."""
    seed = trial.user_attrs.get("seed")
    return seed is None or str(seed).startswith(_SCREENED_SEEDS)


def _incumbent(study: optuna.Study, limit_bits: int) -> FrozenTrial | None:
    """The best completed recipe within the budget that kept its per-sequence KL: what a screen is paired with."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t) and "seq_kl" in t.user_attrs and t.user_attrs["metrics"]["storage_bits"] <= limit_bits]
    return min(done, key=lambda t: (t.values[0], t.number), default=None)


def quiet_optuna() -> None:
    """Keep Optuna's per-trial INFO lines (with every parameter) out of the CLI's output."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _Objective:
    """Suggest levels -> repair to the budget -> screen (optional) -> evaluate for real -> record KL, paired Δ,
    bpw and recipe."""

    def __init__(self, problem: Problem, limit_bits: int, evaluate: Evaluator, num_sequences: int,
                 config: SearchConfig, reference: Solution, recipe_for: Callable[[Solution], Recipe] | None,
                 windows: _Windows) -> None:
        self.problem, self.limit_bits, self.evaluate = problem, limit_bits, evaluate
        self.num_sequences, self.config, self.reference = num_sequences, config, reference
        self.recipe_for, self.windows = recipe_for, windows
        self._reference_kl: torch.Tensor | None = None
        self._store = (optuna.artifacts.FileSystemArtifactStore(str(_artifact_dir(config)))
                       if config.artifacts and recipe_for is not None else None)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr("owner", process_owner())
        raw = self._compact_levels(trial) if self.config.compact(self.problem) else self._suggested_levels(trial)
        raw_cost = total_cost(self.problem, raw)
        picks = raw if raw_cost <= self.limit_bits else repair(self.problem, raw, self.limit_bits)
        solution = self.problem.solution(self.problem.assignment(picks), str(trial.user_attrs.get("seed", "search")))
        mark = self.windows.mark()
        kl = self._score(trial, picks, solution)
        cost = self.windows.since(mark)  # this trial's own evaluation (the reference's, once, is not part of it)
        per_sequence = kl.view(self.num_sequences, -1).mean(dim=1)
        mean, se = float(kl.mean()), bootstrap_se(per_sequence)
        diff, diff_se = paired_difference(kl, self._reference(solution, kl), self.num_sequences)
        params = self.problem.total_params
        bpw = solution.cost / params
        metrics = {"bpw": bpw, "storage_bits": solution.cost, "predicted": solution.loss, "kl_se": se,
                   "dkl_vs_ref": diff, "dkl_vs_ref_se": diff_se,
                   "raw_bpw_excess": (raw_cost - self.limit_bits) / params, **cost}
        # Note: one attribute per kind of value, because every attribute is one SQLite commit (~10 ms here)
        trial.set_user_attr("levels", picks)
        trial.set_user_attr("assignment", solution.assignment)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("seq_kl", [float(v) for v in per_sequence])  # paired decisions between trials
        trial.set_constraint("bpw_excess", (solution.cost - self.limit_bits) / params)
        self._attach(trial, solution, mean, se)
        log.info("trial %d (%s): %.4f bpw, KL %.4e ± %.1e, vs %s %+.2e ± %.1e", trial.number, solution.solver, bpw,
                 mean, se, self.reference.solver, diff, diff_se)
        return (mean, bpw) if self.config.multi_objective else mean

    def _suggested_levels(self, trial: optuna.Trial) -> list[int]:
        return [trial.suggest_int(name, 0, len(opts) - 1) if len(opts) > 1 else 0
                for name, opts in zip(self.problem.names, self.problem.options, strict=True)]

    def _compact_levels(self, trial: optuna.Trial) -> list[int]:
        """A seed's levels (enqueued with it), else the local sampler's proposal, else (before any trial has
        completed, or when everything nearby was evaluated) random levels seeded by the trial number."""
        if "levels" in trial.user_attrs:
            return list(trial.user_attrs["levels"])
        sampler = trial.study.sampler
        proposed = sampler.propose(trial.study, trial.number) if isinstance(sampler, LocalMoveSampler) else None
        if proposed is not None:
            return proposed
        rng = random.Random(f"{self.config.seed}:{trial.number}")
        return [rng.randrange(len(opts)) for opts in self.problem.options]

    def _score(self, trial: optuna.Trial, picks: list[int], solution: Solution) -> torch.Tensor:
        """Per-token KL on every window; a screened proposal first on the screening chunks, pruned there when
        the incumbent is better by more than `screen_z` paired SEs, else completed with the other chunks."""
        screened = self.windows.screened if _screens(trial) else 0
        incumbent = _incumbent(trial.study, self.limit_bits) if screened else None
        if incumbent is None:
            return self._evaluate(solution.assignment, None)
        mark = self.windows.mark()
        head = self._evaluate(solution.assignment, range(0, screened))
        windows = sum(self.windows.chunks[:screened])
        diff = head.view(windows, -1).mean(dim=1) - torch.tensor(incumbent.user_attrs["seq_kl"][:windows],
                                                                 dtype=torch.float64)
        screen = {"windows": windows, "kl": float(head.mean()), "incumbent": incumbent.number,
                  "diff": float(diff.mean()), "diff_se": bootstrap_se(diff), "z": self.config.screen_z}
        trial.report(screen["kl"], step=windows)
        if screen["diff"] > self.config.screen_z * screen["diff_se"]:  # a NaN SE (one window) never prunes
            trial.set_user_attr("levels", picks)  # so the sampler never proposes it again
            trial.set_user_attr("assignment", solution.assignment)
            trial.set_user_attr("screen", {**screen, **self.windows.since(mark)})
            log.info("trial %d pruned after %d windows: KL %.4e, %+.2e ± %.1e vs trial %d", trial.number, windows,
                     screen["kl"], screen["diff"], screen["diff_se"], incumbent.number)
            raise optuna.TrialPruned()
        trial.set_user_attr("screen", screen)
        return torch.cat([head, self._evaluate(solution.assignment, range(screened, len(self.windows.chunks)))])

    def _evaluate(self, assignment: Mapping[str, Option], chunks: range | None) -> torch.Tensor:
        kl = self.evaluate(assignment) if chunks is None else self.evaluate(assignment, chunks)
        return kl.double()

    def _reference(self, solution: Solution, kl: torch.Tensor) -> torch.Tensor:
        if self._reference_kl is None:
            same = solution.assignment == self.reference.assignment
            self._reference_kl = kl if same else self._evaluate(self.reference.assignment, None)
        return self._reference_kl

    def _attach(self, trial: optuna.Trial, solution: Solution, mean: float, se: float) -> None:
        if self._store is None or self.recipe_for is None:
            return
        recipe = self.recipe_for(Solution(solution.assignment, solution.cost, solution.loss, solution.solver,
                                          {"calibration": mean, "calibration_se": se}))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}-recipe.yaml"
            path.write_text(recipe.to_yaml(), encoding="utf-8")
            optuna.artifacts.upload_artifact(artifact_store=self._store, file_path=str(path), study_or_trial=trial,
                                             mimetype="application/yaml")


def _artifact_dir(config: SearchConfig) -> Path:
    path = Path(config.studies_dir) / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _make_sampler(problem: Problem, limit_bits: int, config: SearchConfig) -> optuna.samplers.BaseSampler:
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True, n_startup_trials=5)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    return LocalMoveSampler(problem, limit_bits, config.seed, config.max_moves, config.explore_top,
                            config.multi_objective, correct=config.correct, compact=config.compact(problem))


def _fingerprint(problem: Problem, limit_bits: int, config: SearchConfig, context: Mapping[str, Any]) -> str:
    payload = {"names": problem.names, "options": problem.options, "costs": problem.costs, "limit": limit_bits,
               "multi_objective": config.multi_objective, "context": dict(context)}
    if config.compact(problem):  # its trials hold no parameters: a study of the other kind cannot be resumed
        payload["compact"] = True
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _open_study(problem: Problem, limit_bits: int, config: SearchConfig, context: Mapping[str, Any]) -> optuna.Study:
    directions = ["minimize", "minimize"] if config.multi_objective else ["minimize"]
    try:
        storage = open_storage(config.storage_url)
        study = optuna.create_study(study_name=config.study_name, storage=storage, directions=directions,
                                    sampler=_make_sampler(problem, limit_bits, config), load_if_exists=True)
    except (MixprecError, ValueError):  # ours, and Optuna's own "directions differ" message
        raise
    except Exception as exc:  # sqlalchemy / driver / OS errors: one line naming the storage
        raise describe_open_error(config.storage_url, exc) from exc
    fingerprint = _fingerprint(problem, limit_bits, config, context)
    recorded = study.user_attrs.get(_STUDY_ATTR)
    if recorded is None:
        study.set_user_attr(_STUDY_ATTR, {"fingerprint": fingerprint, "limit_bits": limit_bits,
                                          "groups": list(problem.names), **dict(context)})
        with warnings.catch_warnings():  # experimental since 3.2 but stable in practice; the dashboard uses it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["kl", "bpw"] if config.multi_objective else ["kl"])
    elif recorded["fingerprint"] != fingerprint:
        raise FingerprintMismatchError(
            f"study {config.study_name!r} in {config.storage_url} was run for another model, measurement, budget, "
            "constraints or comparison windows (studies made before `--select auto` compared on the measurement's "
            "own); give a new --study name (or --storage, or a fresh --work for the demo) to start afresh")
    return study


def _recover_stale(study: optuna.Study) -> None:
    """Fail RUNNING trials left by a killed process on this host, so their slots are run again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner")
        if owner is None or owner_is_dead(owner):
            log.warning("trial %d was left running by a stopped process; it is marked failed", trial.number)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _enqueue_seeds(study: optuna.Study, problem: Problem, seeds: Sequence[Solution], compact: bool = False) -> None:
    """Enqueue each distinct seed unless a live (waiting, running or complete) trial already has its params."""
    if compact:
        _enqueue_compact(study, problem, seeds)
        return
    searchable = [i for i, o in enumerate(problem.options) if len(o) > 1]
    live = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL]
    for seed in seeds:
        picks = problem.indices(seed.assignment)
        params = {problem.names[i]: picks[i] for i in searchable}
        if params in live:
            continue
        study.enqueue_trial(params, user_attrs={"seed": seed.solver})
        live.append(params)


def _enqueue_compact(study: optuna.Study, problem: Problem, seeds: Sequence[Solution]) -> None:
    """Compact trials: each seed's levels travel as a user attribute; distinct by levels."""
    live = {tuple(t.user_attrs["levels"]) for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL and "levels" in t.user_attrs}
    for seed in seeds:
        levels = tuple(problem.indices(seed.assignment))
        if levels not in live:
            study.enqueue_trial({}, user_attrs={"seed": seed.solver, "levels": list(levels)})
            live.add(levels)


def _history(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rows.append({"number": t.number, "seed": t.user_attrs.get("seed", "search"), "kl": t.values[0],
                     **t.user_attrs["metrics"], "feasible": feasible(t)})
    return rows


def _pruned(study: optuna.Study) -> list[dict[str, Any]]:
    """What every pruned trial cost and why it stopped: its screening KL, paired difference ± SE, windows."""
    return [{"number": t.number, "seed": t.user_attrs.get("seed", "search"), **t.user_attrs["screen"]}
            for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if "screen" in t.user_attrs]


def _choose(study: optuna.Study, problem: Problem, limit_bits: int) -> Solution:
    """Lowest calibration KL among feasible trials within the budget, never one a uniform trial of no more
    bits beats (FIELD.md §3 row 1)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t) and t.user_attrs["metrics"]["storage_bits"] <= limit_bits]
    if not done:
        raise MixprecError("the study has no completed recipe within the budget; run more --trials")
    best = min(done, key=lambda t: (t.values[0], t.number))
    uniforms = [t for t in done if str(t.user_attrs.get("seed", "")).startswith("uniform")
                and t.user_attrs["metrics"]["storage_bits"] <= best.user_attrs["metrics"]["storage_bits"]
                and t.values[0] < best.values[0]]
    if uniforms:
        best = min(uniforms, key=lambda t: t.values[0])
    m = best.user_attrs["metrics"]
    return Solution(dict(best.user_attrs["assignment"]), int(m["storage_bits"]), float(m["predicted"]),
                    str(best.user_attrs.get("seed", "search")),
                    {"calibration": best.values[0], "calibration_se": m["kl_se"], "trial": best.number,
                     **_decision(best, done)})


def _decision(best: FrozenTrial, done: Sequence[FrozenTrial]) -> dict[str, float]:
    """The paired margin of the choice: runner-up KL minus chosen KL on the same calibration sequences, with
    its standard error (a margin under ~2 SE means the two were not told apart)."""
    rivals = [t for t in done if t.number != best.number and "seq_kl" in t.user_attrs
              and t.user_attrs["levels"] != best.user_attrs["levels"]]
    if not rivals or "seq_kl" not in best.user_attrs:
        return {}
    runner = min(rivals, key=lambda t: (t.values[0], t.number))
    diff = torch.tensor(runner.user_attrs["seq_kl"], dtype=torch.float64) - torch.tensor(best.user_attrs["seq_kl"],
                                                                                           dtype=torch.float64)
    return {"decision_margin": float(diff.mean()), "decision_se": bootstrap_se(diff),
            "runner_up_trial": float(runner.number)}


def _measured(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]


def _enqueue_corrected(study: optuna.Study, problem: Problem, limit_bits: int, config: SearchConfig) -> None:
    """When the queue is empty, refit the interaction correction on every measured recipe and enqueue the
    exact DP solutions of the corrected estimate nearest the budget that were not measured yet."""
    if not config.correct or config.multi_objective:
        return
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    done = _measured(study)
    if len(done) < config.correct_after:
        return
    correction = fit(problem, [t.user_attrs["levels"] for t in done], [t.values[0] for t in done])
    if not correction.helps:
        return
    seen = {tuple(t.user_attrs.get("levels", ())) for t in study.get_trials(deepcopy=False)}
    front = pareto_front(correction.apply(problem)).near(limit_bits, 2)
    fresh = [s for s in front if tuple(problem.indices(s.assignment)) not in seen]
    labelled = [problem.solution(s.assignment, f"corrected-{s.solver}") for s in fresh]
    _enqueue_seeds(study, problem, labelled, config.compact(problem))


def run_search(problem: Problem, limit_bits: int, evaluate: Evaluator, num_sequences: int,
               seeds: Sequence[Solution], config: SearchConfig,
               recipe_for: Callable[[Solution], Recipe] | None = None,
               context: Mapping[str, Any] | None = None, chunks: Sequence[int] = (),
               spent: Callable[[], float] | None = None) -> SearchResult:
    """Run (or resume) the study until it holds `config.trials` completed or pruned trials; return the chosen
    recipe (always a completed trial).

    `seeds` are enqueued in order; the first is the paired reference of every trial (the DP solution
    at the budget, normally). `context` (model and measurement fingerprints, budget) is stored in the
    study and must match when a study is resumed. `chunks` are the evaluator's windows per chunk
    (`KLEngine.chunk_sequences`; needed to screen) and `spent` its token-layers counter (per-trial cost).
    """
    if not seeds:
        raise MixprecError("the search needs at least one seed recipe (the DP solution at the budget)")
    over = [s.solver for s in seeds if s.cost > limit_bits]
    if over:
        raise MixprecError(f"seed recipe(s) {over} exceed the budget; only seeds within it can be enqueued")
    study = _open_study(problem, limit_bits, config, context or {})
    _recover_stale(study)
    _enqueue_seeds(study, problem, seeds, config.compact(problem))
    windows = _Windows.of(config, num_sequences, chunks, spent)
    objective = _Objective(problem, limit_bits, evaluate, num_sequences, config, seeds[0], recipe_for, windows)
    remaining = config.trials - len(study.get_trials(deepcopy=False, states=_COUNTED))
    for _ in progress(range(max(remaining, 0)), desc=f"study {config.study_name}", unit="trial"):
        _enqueue_corrected(study, problem, limit_bits, config)
        study.optimize(objective, n_trials=1)  # one at a time, so the bar moves per finished trial
    pareto = ([{"number": t.number, "kl": t.values[0], "bpw": t.values[1]} for t in study.best_trials]
              if config.multi_objective else [])
    done = _measured(study)
    correction = (fit(problem, [t.user_attrs["levels"] for t in done], [t.values[0] for t in done]).to_dict()
                  if len(done) >= 3 else {})
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return SearchResult(_choose(study, problem, limit_bits), _history(study), config.study_name,
                        config.storage_url, sorted(pareto, key=lambda r: r["bpw"]), correction, waiting,
                        _pruned(study))
