"""The search stage end to end: measurement -> exact proxy solutions -> Optuna study -> held-out check -> recipe.

`prepare` (in `mixprec.search.inputs`) validates everything that can be checked without loading the
model, so bad input fails in a second. `run_stage` then

1. solves the additive estimate exactly (Pareto DP) and builds the baselines at the same budget:
   exllamav3's greedy, the `--hq` rule, the largest uniform recipe that fits, and the smallest
   uniform quant at or above the budget over every measured width *and* group size (the
   publisher's "nearest uniform quant" comparison, `mixprec.search.inputs.uniform_grid`; a variant
   at another group size is quantized on demand and evaluated with its own engine);
2. runs the study on the measurement's own calibration windows (`mixprec.search.study`), seeded with the
   DP points nearest the budget, the baselines that fit and the other seeds of
   `mixprec.search.inputs.seeds`;
3. re-measures the chosen recipe and every baseline on the held-out **evaluation** split with a
   second engine (`require_disjoint` refuses the calibration tokens), paired on the same tokens, so
   each difference comes with the standard error of the difference;
4. returns the recipe with predicted / calibration / evaluation KL and its provenance; when the
   nearest uniform quant fits the budget and beats the study's pick on calibration data, that is
   shipped instead (FIELD.md §3 row 1).

`run_stages` does steps 1-2 once per quantizer group size and finishes (3-4) with the recipe of
the lowest calibration KL, the others joining its held-out comparison.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mixprec.core.errors import FingerprintMismatchError, MixprecError
from mixprec.core.fileio import sha256_file
from mixprec.core.kl import bootstrap_se, paired_difference
from mixprec.formats.recipe import ModelRef, Recipe
from mixprec.measure.engine.core import EngineConfig, KLEngine, resolve_device
from mixprec.model.arch import GroupKind
from mixprec.model.data import BUNDLED_SPLITS, TokenWindows, WindowConfig, load_windows, require_disjoint
from mixprec.model.streaming import StreamedModel, available_memory, open_model
from mixprec.quant import QuantConfig
from mixprec.quant.variants import Variant, ensure_variants
from mixprec.search.costs import CostTable
from mixprec.search.gain import UniformCurve, UniformPoint
from mixprec.search.inputs import (
    Inputs,
    StageConfig,
    UniformQuant,
    baselines,
    nearest_uniform,
    prepare,
    seeds,
    uniform_grid,
)
from mixprec.search.solve import Solution
from mixprec.search.study import SearchResult, run_search

__all__ = ["StageResult", "EngineCache", "SMALLER_BUDGET", "paired_ratio_se", "uniform_curve", "run_stage",
           "run_stages", "baseline_recipes"]

log = logging.getLogger(__name__)

#: Name of the candidate that is the recipe shipped at the next smaller budget of a sweep (`run_budgets`).
SMALLER_BUDGET = "smaller-budget"


@dataclass
class _Candidate:
    """A compared recipe and the variants it runs on (None: the measured ones of the stage)."""

    solution: Solution
    variants: dict[int, Variant] | None = None


@dataclass
class StageResult:
    """The shipped recipe, the held-out comparison rows, the study, and (when asked) the uniform curve and
    the calibration cost of the study in token-layers (scored tokens x decoder layers run, screens included),
    its completed trials and its pruned ones (`SearchConfig.screen`)."""

    recipe: Recipe
    comparison: list[dict[str, Any]]
    search: SearchResult
    shipped: _Candidate | None = None
    curve: UniformCurve | None = None
    cost: dict[str, float] = field(default_factory=dict)


def _calibration_windows(inputs: Inputs, between: bool = False) -> TokenWindows:
    """The measurement's windows, rebuilt and checked against its token hash (`between`: then the windows
    halfway between them, from the same text)."""
    data = inputs.measurement.summary.data
    # Note: a shipped split is named "<model folder>:<split>"; the folder may have been moved or renamed since,
    # so the split is read from the model folder as it is now, and the token hash below proves it is the same.
    shipped = data.split in BUNDLED_SPLITS and data.source.endswith(f":{data.split}")
    files = None if shipped else [Path(p) for p in data.source.split(",")]
    config = WindowConfig(data.seq_len, data.num_windows)
    windows = load_windows(inputs.checkpoint.path, data.split, config, files)
    if windows.spec.sha256 != data.sha256:
        raise FingerprintMismatchError(f"the calibration tokens of {inputs.measurement.folder} cannot be rebuilt "
                                       f"from {data.source} (sha256 differs); re-run `mixprec measure`")
    return load_windows(inputs.checkpoint.path, data.split, config, files, between=True) if between else windows


def _selection_windows(inputs: Inputs, config: StageConfig) -> TokenWindows:
    """The windows recipes are compared on: the measurement's (`select="same"`), or the ones halfway between
    them (`"between"`; `"auto"`: those when the text is long enough). Every estimate and every DP point is
    fitted to the measurement windows' noise, so on those windows the fitted recipes look better than they
    are (on the bundled model the per-expert DP picks' KL there was 7-33% below their held-out KL, greedy's
    0-14%); on the windows between, decisions and the recorded KL are not biased towards the fitted recipes."""
    if config.select == "same":
        return _calibration_windows(inputs)
    try:
        return _calibration_windows(inputs, between=True)
    except FingerprintMismatchError:
        raise
    except MixprecError as exc:  # the text holds too few windows to put others between them
        if config.select == "between":
            raise
        log.info("comparing recipes on the measurement's own windows: %s", exc)
        return _calibration_windows(inputs)


def _compare(engine_for: Callable[[str], KLEngine], solutions: dict[str, Solution],
             chosen: str) -> dict[str, dict[str, float]]:
    """KL ± SE of every solution and its paired difference from `chosen`, all on the same windows."""
    kls = {name: engine_for(name).evaluate(s.assignment).kl for name, s in solutions.items()}
    n = engine_for(chosen).num_sequences
    out = {}
    for name, kl in kls.items():
        diff, diff_se = paired_difference(kl, kls[chosen], n)
        out[name] = {"kl": float(kl.double().mean()), "se": _sequence_se(kl, n), "diff": diff, "diff_se": diff_se,
                     "ratio_se": paired_ratio_se(kl, kls[chosen], n)}
    return out


def _sequence_se(kl: torch.Tensor, num_sequences: int) -> float:
    return bootstrap_se(kl.double().view(num_sequences, -1).mean(dim=1))


def paired_ratio_se(kl_a: torch.Tensor, kl_b: torch.Tensor, num_sequences: int, n_boot: int = 1000,
                    seed: int = 0) -> float:
    """Bootstrap SE of mean(KL_a) / mean(KL_b) on the same tokens, resampling whole sequences for both at once
    (so what the two share, e.g. hard sequences, cancels as in `paired_difference`)."""
    a = kl_a.double().view(num_sequences, -1).mean(dim=1)
    b = kl_b.double().view(num_sequences, -1).mean(dim=1)
    if num_sequences < 2:
        return float("nan")
    picks = torch.randint(0, num_sequences, (n_boot, num_sequences), generator=torch.Generator().manual_seed(seed))
    return float((a[picks].mean(dim=1) / b[picks].mean(dim=1)).std())


def _recipe(inputs: Inputs, config: StageConfig, solution: Solution, kl: dict[str, float],
            provenance: dict[str, Any], variants: dict[int, Variant] | None = None) -> Recipe:
    """The recipe of `solution` over `variants` (default: the measured ones, whose group size it records)."""
    variants = variants or inputs.variants
    table = inputs.table if variants is inputs.variants else CostTable.from_variants(inputs.model_map, variants)
    quantizer = next(iter(variants.values())).config.settings
    return Recipe(
        model=ModelRef(inputs.checkpoint.path.name, inputs.checkpoint.model_type, inputs.checkpoint.fingerprint),
        granularity=inputs.model_map.granularity, quantizer=quantizer,
        groups=dict(solution.assignment), budget=config.budget, achieved=table.achieved(solution.assignment),
        provenance=provenance, kl=kl)


def baseline_recipes(inputs: Inputs, config: StageConfig) -> dict[str, Recipe]:
    """The rule baselines at the budget (exllamav3's greedy on each option family, `--hq`, the DP point) as
    recipes, so a benchmark can compare them paired with recipes of another table or granularity."""
    return {name: _recipe(inputs, config, solution, {"predicted": solution.loss}, {"solver": solution.solver})
            for name, solution in baselines(inputs).items()}


def _variant_provenance(variants: dict[Any, Variant]) -> dict[str, dict[str, str]]:
    return {str(b): {"variant_id": v.manifest.variant_id, "sha256": v.manifest.file_sha256}
            for b, v in sorted(variants.items(), key=lambda kv: str(kv[0]))}


def _provenance(inputs: Inputs, config: StageConfig, windows: TokenWindows) -> dict[str, Any]:
    m = inputs.measurement
    return {
        "stage": "mixprec search",
        "measurement": {"folder": str(m.folder), "table_sha256": sha256_file(m.folder / "table.csv"),
                        "mode": m.summary.settings.mode, "granularity": m.summary.settings.granularity},
        "variants": _variant_provenance(inputs.variants),
        "calibration": windows.spec.to_dict(),
        "constraints": asdict(config.constraints),
        "search": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.search).items()},
        "null_bits_per_weight": 16,
    }


class EngineCache:
    """Engines (fp32 model + reference on fixed windows) kept across searches of one model and granularity,
    so a sweep over budgets captures each reference once. Pass one to `run_stage` to share it.

    `streaming` (`STREAMING_MODES`) and `max_memory` (bytes; default what is free) choose how the fp32 model is
    opened and, when streamed, what the engines' caches share."""

    def __init__(self, streaming: str = "auto", max_memory: int | None = None) -> None:
        self.streaming, self.max_memory = streaming, max_memory
        self._engines: dict[tuple[str, str, str, tuple[str, ...]], KLEngine] = {}
        self._models: dict[str, torch.nn.Module | StreamedModel] = {}
        self._variant_sets: dict[tuple[str, str, tuple[int, ...]], dict[int, Variant]] = {}
        self.curves: dict[tuple[Any, ...], UniformCurve] = {}

    def get(self, inputs: Inputs, windows: TokenWindows, device: str,
            variants: dict[int, Variant] | None = None) -> KLEngine:
        """The engine on `windows` over `variants` (default: the measured ones)."""
        variants = inputs.variants if variants is None else variants
        ids = tuple(v.manifest.variant_id for _, v in sorted(variants.items()))
        key = (inputs.checkpoint.fingerprint, inputs.model_map.granularity.value, windows.spec.sha256, ids)
        if key not in self._engines:
            fingerprint = inputs.checkpoint.fingerprint
            if fingerprint not in self._models:
                # streamed (one layer resident) when the fp32 model would not fit comfortably in the budget
                self._models[fingerprint] = open_model(inputs.checkpoint, self.streaming, resolve_device(device),
                                                       self.max_memory)
            model = self._models[fingerprint]
            self._engines[key] = KLEngine(model, inputs.model_map, windows, variants, device,
                                          self._engine_config(model, device))
        return self._engines[key]

    def _engine_config(self, model: torch.nn.Module | StreamedModel, device: str) -> EngineConfig:
        """Default caches; a streamed model was chosen because memory is short, so there every engine's caches
        share what is free now (several engines, e.g. calibration and held-out windows, each take a share)."""
        if not isinstance(model, StreamedModel):
            return EngineConfig()
        budget = self.max_memory if self.max_memory is not None else available_memory(resolve_device(device))
        return EngineConfig().within(budget // (len(self._engines) + 2))

    @property
    def layer_forwards(self) -> int:
        """Decoder-layer forwards (of one job over the windows it ran) by every engine of this cache so far."""
        return sum(engine.layer_forwards for engine in self._engines.values())

    @property
    def token_layers(self) -> int:
        """Scored tokens x decoder layers run by every engine of this cache so far."""
        return sum(engine.token_layers for engine in self._engines.values())

    @classmethod
    def for_config(cls, config: StageConfig) -> EngineCache:
        """An empty cache opening the model as `config`'s measurement settings say (streaming, memory budget)."""
        measure = config.measure_config()
        return cls(measure.streaming, measure.max_memory)

    def variant_set(self, inputs: Inputs, config: StageConfig, quant: QuantConfig,
                    widths: tuple[int, ...]) -> dict[int, Variant]:
        """`widths` at `quant`'s settings (e.g. another group size), built on demand (only what is asked: a
        variant is as big as the model's quantized weights), one shared dict per request so its engine is."""
        key = (inputs.checkpoint.fingerprint, replace(quant, bits=2).variant_id, widths)
        if key not in self._variant_sets:
            kinds = tuple(GroupKind(k) for k in next(iter(inputs.variants.values())).manifest.kinds)
            configs = [replace(quant, bits=b) for b in widths]
            built = ensure_variants(inputs.checkpoint, inputs.model_map, configs, config.work, kinds)
            self._variant_sets[key] = {v.config.bits: v for v in built}
        return self._variant_sets[key]


def _uniform_candidate(inputs: Inputs, config: StageConfig, quant: UniformQuant, engines: EngineCache,
                       widths: tuple[int, ...] | None = None) -> _Candidate:
    """A uniform quant as a candidate; another group size than measured runs on its own variants (its own
    width, or `widths` of that size so that one engine serves a whole curve), built on demand."""
    bits = quant.config.bits
    measured = next((key for key, v in inputs.variants.items() if v.config == quant.config), None)
    if measured is not None:  # one of the searched options (a width, or an option label with --options)
        return _Candidate(Solution(dict.fromkeys(inputs.table.names, measured), quant.cost, math.nan, quant.label))
    solution = Solution(dict.fromkeys(inputs.table.names, bits), quant.cost, math.nan, quant.label)
    return _Candidate(solution, engines.variant_set(inputs, config, quant.config, widths or (bits,)))


@dataclass
class _Searched:
    """One stage after its study: everything the held-out check and the recipe need."""

    config: StageConfig
    inputs: Inputs
    result: SearchResult
    provenance: dict[str, Any]
    calibration: TokenWindows
    uniform: UniformQuant
    candidates: dict[str, _Candidate]
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return next(iter(self.inputs.variants.values())).config.group_size


def _uniform_candidates(inputs: Inputs, config: StageConfig, engines: EngineCache,
                        compared: dict[str, Solution]) -> tuple[UniformQuant, dict[str, _Candidate]]:
    """The nearest uniform quant at or above the budget (`uniform`) and, per group size, the largest uniform
    quant that fits (`uniform-fit-g<size>`): every uniform option the shipped recipe must not lose to."""
    grid = uniform_grid(inputs, config.uniform_group_sizes)
    nearest = nearest_uniform(grid, inputs.limit_bits)
    found = {"uniform": _uniform_candidate(inputs, config, nearest, engines)}
    searched = next(iter(inputs.variants.values())).config.settings  # its fitting uniform is `uniform-fit`
    for family in sorted({u.config.settings for u in grid}, key=lambda f: (f.method != "rtn", f.method, f.group_size)):
        if family == searched and "uniform-fit" in compared:
            continue
        fitting = [u for u in grid if u.config.settings == family and u.cost <= inputs.limit_bits]
        if fitting and fitting[-1].label != nearest.label:
            method = "" if family.method == "rtn" else f"-{family.method}"
            found[f"uniform-fit-g{family.group_size}{method}"] = _uniform_candidate(inputs, config, fitting[-1],
                                                                                     engines)
    return nearest, found


def _study(config: StageConfig, inputs: Inputs, engines: EngineCache,
           extra_seeds: Sequence[Solution] = ()) -> _Searched:
    """Baselines, the uniform quants, and the study on the measurement's calibration windows (seeded also
    with `extra_seeds`, e.g. the recipes of neighbouring budgets, moved to this budget)."""
    compared = {k: v for k, v in baselines(inputs).items() if k != "dp"}
    quant, uniforms = _uniform_candidates(inputs, config, engines, compared)
    calibration = _selection_windows(inputs, config)
    engine = engines.get(inputs, calibration, config.device)
    provenance = _provenance(inputs, config, calibration)

    def recipe_for(solution: Solution) -> Recipe:
        return _recipe(inputs, config, solution, {"predicted": solution.loss, **solution.extra},
                       {**provenance, "solver": solution.solver})

    starts = seeds(inputs, compared, config.search.front_seeds)
    starts = starts[:1] + list(extra_seeds) + starts[1:]  # the DP point stays first: the paired reference
    context = {"model": inputs.checkpoint.fingerprint, "measurement": provenance["measurement"]["table_sha256"],
               "budget": asdict(config.budget), "constraints": provenance["constraints"]}
    if calibration.spec.sha256 != inputs.measurement.summary.data.sha256:  # trials on other windows: another study
        context["selection"] = calibration.spec.sha256
    before = engine.token_layers
    result = run_search(inputs.problem, inputs.limit_bits, lambda a, chunks=None: engine.evaluate(a, chunks).kl,
                        engine.num_sequences, starts, config.search, recipe_for, context,
                        chunks=engine.chunk_sequences, spent=lambda: float(engine.token_layers))
    cost = {"study_token_layers": float(engine.token_layers - before), "study_trials": float(len(result.history)),
            "study_pruned": float(len(result.pruned))}
    candidates = {"mixprec": _Candidate(result.best), **{k: _Candidate(v) for k, v in compared.items()}, **uniforms}
    return _Searched(config, inputs, result, provenance, calibration, quant, candidates, cost)


def _shippable(name: str) -> bool:
    """Candidates the stage may ship: the study's pick, a uniform quant, or the smaller budget's recipe."""
    return name == "mixprec" or name.startswith("uniform") or name == SMALLER_BUDGET


def _ship(candidates: dict[str, _Candidate], calib: dict[str, dict[str, float]], limit_bits: int) -> str:
    """The shippable candidate within the budget with the lowest calibration KL (ties keep the study's pick):
    never a recipe that a uniform quant that fits beats (FIELD.md §3 row 1), never worse than the recipe
    shipped at a smaller budget (it fits this one too)."""
    names = [n for n, c in candidates.items() if _shippable(n) and c.solution.cost <= limit_bits]
    return min(names, key=lambda n: (calib[n]["kl"], n != "mixprec"))


def _finish(searched: _Searched, engines: EngineCache, extra: dict[str, _Candidate] | None = None) -> StageResult:
    """Re-measure every candidate on calibration and held-out windows (paired), guard, and build the recipe."""
    config, inputs, result = searched.config, searched.inputs, searched.result
    candidates = {**searched.candidates, **(extra or {})}
    solutions = {name: c.solution for name, c in candidates.items()}

    def engine_for(windows: TokenWindows) -> Callable[[str], KLEngine]:
        return lambda name: engines.get(inputs, windows, config.device, candidates[name].variants)

    calib = _compare(engine_for(searched.calibration), solutions, "mixprec")
    held_out = load_windows(inputs.checkpoint.path, "evaluation",
                            WindowConfig(config.eval_seq_len, config.eval_windows), list(config.eval_files) or None)
    require_disjoint(searched.calibration.spec, held_out.spec)
    evaluation = _compare(engine_for(held_out), solutions, "mixprec")
    curve = uniform_curve(inputs, config, engines, held_out) if config.gain_curve else None
    rows = _rows(inputs, solutions, calib, evaluation, curve)
    provenance = {**searched.provenance, "study": {"name": result.study_name, "storage": result.storage_url},
                  "evaluation": held_out.spec.to_dict(), "comparison": rows}
    shipped = _ship(candidates, calib, inputs.limit_bits)
    best = candidates[shipped].solution
    provenance["solver"] = f"search (best trial {best.extra.get('trial')}, from {best.solver})"
    if shipped != "mixprec":
        log.warning("%s (%s) beats the searched recipe on calibration data; shipping it", shipped, best.solver)
        provenance["solver"] = f"{best.solver} ({shipped}: it beat the study's best trial on calibration data)"
        provenance["variants"] = _variant_provenance(candidates[shipped].variants or inputs.variants)
    kl = {"calibration": calib[shipped]["kl"], "calibration_se": calib[shipped]["se"],
          "evaluation": evaluation[shipped]["kl"], "evaluation_se": evaluation[shipped]["se"]}
    if not math.isnan(best.loss):
        kl["predicted"] = best.loss
    recipe = _recipe(inputs, config, best, kl, provenance, candidates[shipped].variants)
    log.info("search at %s: %d layer forwards, %d token-layers so far", config.budget, engines.layer_forwards,
             engines.token_layers)
    return StageResult(recipe, rows, result, _Candidate(best, candidates[shipped].variants), curve,
                       {**searched.cost, "shipped": shipped})  # type: ignore[dict-item]


def uniform_curve(inputs: Inputs, config: StageConfig, engines: EngineCache, windows: TokenWindows) -> UniformCurve:
    """Held-out KL of every uniform quant of the grid (every measured width x `uniform_group_sizes`), as the
    curve the equivalent-uniform-bpw gain is read from; computed once per model, windows and grid."""
    grid = uniform_grid(inputs, config.uniform_group_sizes)
    key = (inputs.checkpoint.fingerprint, windows.spec.sha256, tuple(u.label for u in grid),
           next(iter(inputs.variants.values())).config.variant_id)
    if key not in engines.curves:
        points = []
        for quant in grid:
            widths = tuple(sorted({v.config.bits for v in inputs.variants.values()}))
            candidate = _uniform_candidate(inputs, config, quant, engines, widths)
            engine = engines.get(inputs, windows, config.device, candidate.variants)
            kl = float(engine.evaluate(candidate.solution.assignment).kl.double().mean())
            points.append(UniformPoint(quant.label, quant.cost / inputs.table.params, kl))
        engines.curves[key] = UniformCurve.from_points(points)
    return engines.curves[key]


def run_stage(config: StageConfig, inputs: Inputs | None = None, engines: EngineCache | None = None) -> StageResult:
    """Search, check on held-out data, and return the recipe plus the comparison table (see module doc)."""
    engines = engines or EngineCache.for_config(config)
    return _finish(_study(config, inputs or prepare(config), engines), engines)


def run_stages(configs: Sequence[StageConfig], inputs: Sequence[Inputs] | None = None,
               engines: EngineCache | None = None) -> StageResult:
    """One study per quantizer group size (one `StageConfig` each, same budget and calibration windows);
    the recipe with the lowest calibration KL wins, and the others' recipes join its held-out comparison
    as `mixprec-g<size>`. A recipe holds one group size, so this is the recipe-level group-size choice."""
    if not configs:
        raise MixprecError("run_stages needs at least one stage configuration")
    engines = engines or EngineCache.for_config(configs[0])
    prepared = list(inputs) if inputs is not None else [prepare(c) for c in configs]
    searched = [_study(c, i, engines) for c, i in zip(configs, prepared, strict=True)]
    sizes = [s.group_size for s in searched]
    if len(set(sizes)) != len(sizes):
        raise MixprecError(f"the stages must differ in group size, got {sizes}")
    chosen = min(searched, key=lambda s: (s.result.best.extra["calibration"], s.group_size))
    extra = {f"mixprec-g{s.group_size}": _Candidate(s.result.best, s.inputs.variants)
             for s in searched if s is not chosen}
    return _finish(chosen, engines, extra)


def _gain(curve: UniformCurve | None, kl: float, se: float, bpw: float) -> dict[str, Any]:
    """Equivalent uniform bpw gain of a row, with an SE from the row's own KL SE (delta method: the curve's
    points are measured on the same tokens, so their noise is not added again)."""
    if curve is None:
        return {}
    gain = curve.gain(kl, bpw)
    lo, hi = curve.gain(kl + se, bpw).gain, curve.gain(max(kl - se, kl * 1e-3), bpw).gain
    return {**gain.to_dict(), "gain_se": round((hi - lo) / 2, 4)}


def _rows(inputs: Inputs, compared: dict[str, Solution], calib: dict[str, dict[str, float]],
          evaluation: dict[str, dict[str, float]], curve: UniformCurve | None = None) -> list[dict[str, Any]]:
    rows = []
    for name, solution in compared.items():
        e, c = evaluation[name], calib[name]
        bpw = solution.cost / inputs.table.params
        rows.append({"recipe": name, "solver": solution.solver, "bpw": round(bpw, 4),
                     **_gain(curve, e["kl"], e["se"], bpw),
                     "predicted": None if math.isnan(solution.loss) else solution.loss,
                     "calibration_kl": c["kl"], "calibration_se": c["se"],
                     "calibration_diff": c["diff"], "calibration_diff_se": c["diff_se"],
                     "evaluation_kl": e["kl"], "evaluation_se": e["se"],
                     "diff_vs_mixprec": e["diff"], "diff_se": e["diff_se"],
                     "ratio_vs_mixprec": e["kl"] / evaluation["mixprec"]["kl"], "ratio_se": e["ratio_se"]})
    return rows
