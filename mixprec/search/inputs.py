"""Inputs of the search stage: its configuration, the measurement, exact costs and the estimates.

`prepare` validates everything that can be checked without loading the model (measurement present
and of the right granularity, variants from the same model, constraints resolvable, budget
achievable), so bad input fails in a second. It also turns every finished measurement table into
an additive estimate (`Problem`) and computes the baselines and seed recipes the study starts from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from mixprec.core.errors import FingerprintMismatchError, MixprecError
from mixprec.formats.recipe import Budget
from mixprec.measure.config import MeasureConfig
from mixprec.measure.run import run_measure
from mixprec.measure.table import Measurement, is_finished, load_measurement
from mixprec.model.arch import GroupKind
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import DEFAULT_GRANULARITY, Granularity, ModelMap
from mixprec.quant import SUPPORTED_GROUP_SIZES, QuantConfig, QuantSettings, quantizer_class, storage_bits
from mixprec.quant.options import option_configs, option_label, option_width
from mixprec.quant.variants import Variant
from mixprec.search.costs import Constraints, CostTable, Option, budget_limit_bits, check_feasible
from mixprec.search.estimate import measurement_losses
from mixprec.search.solve import (
    Problem,
    Solution,
    compressed_solutions,
    greedy,
    hq_at_budget,
    pareto_front,
    tied_solutions,
    uniform,
)
from mixprec.search.study import SearchConfig

__all__ = ["StageConfig", "Inputs", "restrict", "UniformQuant", "check", "measure_missing", "unmeasured", "prepare",
           "baselines", "uniform_grid", "nearest_uniform", "seeds", "SELECT_MODES"]

log = logging.getLogger(__name__)


#: Which windows recipes are compared on (`StageConfig.select`).
SELECT_MODES = ("auto", "same", "between")


@dataclass(frozen=True)
class StageConfig:
    """Everything `mixprec search` needs; the measurement settings must match an existing (or new) table."""

    work: Path
    budget: Budget
    model: str | None = None
    granularity: str = DEFAULT_GRANULARITY
    measure: MeasureConfig | None = None
    constraints: Constraints = field(default_factory=Constraints)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval_windows: int = 32
    eval_seq_len: int = 256
    eval_files: tuple[Path, ...] = ()
    device: str = "auto"
    uniform_group_sizes: tuple[int, ...] = SUPPORTED_GROUP_SIZES
    gain_curve: bool = False
    #: Option families (`--options`): each group picks width, method and group size among them jointly.
    options: tuple[QuantSettings, ...] = ()
    #: Windows the study and the shipping choice compare recipes on: the measurement's own (`same`), the
    #: windows halfway between them (`between`), which the sensitivity table never saw, or `auto`: between
    #: when the text holds twice the measurement's windows, else the measurement's.
    select: str = "auto"

    def __post_init__(self) -> None:
        Granularity(self.granularity)
        WindowConfig(self.eval_seq_len, self.eval_windows)
        if self.select not in SELECT_MODES:
            raise MixprecError(f"select={self.select!r} is unknown; use one of {SELECT_MODES}")
        for size in self.uniform_group_sizes:
            QuantSettings(group_size=size)  # validates the value
        if len(set(self.options)) != len(self.options):
            listed = [f"{o.method}-g{o.group_size}" for o in self.options]
            raise MixprecError(f"--options lists a family twice: {listed}")

    def measure_configs(self) -> list[MeasureConfig]:
        """The measurements this search reads: one per option family (`options`), else the one table. Each
        family's drop-mode table measures its options alone against the same reference, so together they
        are one table over options."""
        measure = self.measure_config()
        return [replace(measure, quant=family) for family in self.options] if self.options else [measure]

    def measure_config(self) -> MeasureConfig:
        """The measurement this search reads (default: drop mode at the search granularity)."""
        if self.measure is not None:
            if self.measure.granularity != self.granularity:
                raise MixprecError(f"the measurement is at granularity {self.measure.granularity!r} but the search "
                                   f"is at {self.granularity!r}; measure at the granularity you search")
            return self.measure
        return MeasureConfig(work=self.work, model=self.model, granularity=self.granularity, device=self.device)


@dataclass
class Inputs:
    """Validated inputs of one search: model, map, measurement, variants, costs, options, budget, problem."""

    checkpoint: Checkpoint
    model_map: ModelMap
    measurement: Measurement
    variants: dict[Option, Variant]
    table: CostTable
    options: dict[str, tuple[Option, ...]]
    limit_bits: int
    problem: Problem
    others: dict[str, Problem] = field(default_factory=dict)
    #: The option families searched jointly (variants keyed by option label); empty: one family, by width.
    families: tuple[QuantSettings, ...] = ()

    def family_problem(self, family: QuantSettings) -> Problem:
        """The estimate restricted to one family's options (pinned groups keep theirs): what a search of that
        family alone would solve, and what the width-based baselines (greedy, `--hq`) run on."""
        keep = {key for key, v in self.variants.items() if v.config.settings == family}
        return restrict(self.problem, keep)


def restrict(problem: Problem, keep: set[Option]) -> Problem:
    """`problem` with each group's options cut to `keep` (a group with none of them keeps all its own)."""
    rows = []
    for opts, costs, losses in zip(problem.options, problem.costs, problem.losses, strict=True):
        picks = [k for k, o in enumerate(opts) if o in keep] or list(range(len(opts)))
        rows.append((tuple(opts[k] for k in picks), tuple(costs[k] for k in picks), tuple(losses[k] for k in picks)))
    options, costs, losses = (tuple(r[i] for r in rows) for i in range(3))
    return Problem(problem.names, options, costs, losses, problem.kinds, problem.layers, problem.params)


def _check_settings(measurement: Measurement, measure: MeasureConfig) -> Measurement:
    """Refuse a table measured with other quantizer settings than asked for (its folder name does not say)."""
    settings = measurement.summary.settings
    recorded = {**settings.to_dict(), "clip_grid": settings.quant.clip_grid}
    wanted = {**measure.settings(), "clip_grid": measure.quant.clip_grid, "num_windows": measure.num_windows,
              "seq_len": measure.seq_len}
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if differ:
        described = ", ".join(f"{k}={old!r} there, {new!r} asked" for k, (old, new) in sorted(differ.items()))
        raise FingerprintMismatchError(f"{measurement.folder} was measured with other settings ({described}); pass "
                                       "the same settings, or use another --work folder for a new measurement")
    return measurement


def measure_missing(config: StageConfig) -> Path:
    """The search command's explicit measure step: measure the table `config` needs unless it is finished.

    A separate step, taken after every flag is validated (`check`), rather than a side effect of loading:
    `prepare` only reads a finished table and says how to make one when it is missing.
    """
    for measure in unmeasured(config):  # one table per option family
        _measure_one(measure)
    return config.measure_configs()[0].folder


def unmeasured(config: StageConfig) -> list[MeasureConfig]:
    """The tables `config` reads that are not finished, or lack an asked width: what the measure step must run
    (and the only ones whose variants must exist; a finished table's are checked when it is read)."""
    return [m for m in config.measure_configs() if not (is_finished(m.folder) and _holds_widths(m))]


def _measure_one(measure: MeasureConfig) -> Path:
    log.info("no finished measurement in %s: measuring it now (as `mixprec measure --granularity %s`)",
             measure.folder, measure.granularity)
    folder = run_measure(measure)
    if folder is None:
        raise MixprecError(f"other workers still hold jobs of {measure.folder}; re-run when they finish")
    return folder


def _holds_widths(measure: MeasureConfig) -> bool:
    """Whether the finished table has every width asked: one measured at `--bits 2 …` is extended by a search
    at `--bits 1 2 …` (as `mixprec measure` extends it), not read as if it held width 1."""
    return set(measure.measured_bits) <= set(load_measurement(measure.folder).summary.settings.measured_bits)


def _variants(measurement: Measurement, checkpoint: Checkpoint, widths: tuple[int, ...]) -> dict[Option, Variant]:
    """The measured variants at the widths asked for (`--bits`): a table that also holds other widths (measured
    for another run) searches only these, so `search --bits 2 3 4` never picks a width it was not given."""
    if measurement.summary.model.fingerprint != checkpoint.fingerprint:
        raise FingerprintMismatchError(f"{measurement.folder} was measured on another model; use this model's "
                                       "own --work folder or re-run `mixprec measure`")
    variants = {}
    for bits, info in measurement.summary.variants.items():
        if int(bits) not in widths:
            continue
        variant = Variant.open(info.path, checkpoint.fingerprint)
        if variant.manifest.file_sha256 != info.sha256:
            raise FingerprintMismatchError(f"{info.path} changed since {measurement.folder} was measured; "
                                           "re-run `mixprec measure`")
        variant.verify()  # the file itself, not only its manifest: a damaged one would give NaN KL
        variants[int(bits)] = variant
    return variants


def _check_budget(table: CostTable, config: StageConfig) -> tuple[dict[str, tuple[Option, ...]], int]:
    options = config.constraints.options(table)
    limit = budget_limit_bits(config.budget, table)
    check_feasible(table, options, limit, config.budget)
    return options, limit


def check(config: StageConfig) -> tuple[Checkpoint, ModelMap]:
    """Everything checkable before measuring: the model opens, and the constraints and the budget are
    feasible at costs computed from the quantizer settings (so bad input fails in a second)."""
    checkpoint = Checkpoint.open(config.model)
    model_map = checkpoint.model_map(config.granularity)
    measure = config.measure_config()
    planned: dict[Option, QuantConfig] = ({option_label(c): c for c in option_configs(config.options, measure.bits)}
                                          if config.options else {b: measure.quant_config(b) for b in measure.bits})
    _check_budget(CostTable.from_configs(model_map, planned, [GroupKind(k) for k in measure.kinds]), config)
    if config.select == "between":  # the text must hold windows between the measurement's: say so now
        load_windows(checkpoint.path, measure.split, WindowConfig(measure.seq_len, measure.num_windows),
                     list(measure.data_files) or None, between=True)
    return checkpoint, model_map


def prepare(config: StageConfig) -> Inputs:
    """Validate and assemble the inputs from a finished measurement (`measure_missing` makes one).

    Constraints and the budget are checked against costs computed from the quantizer settings
    before anything is measured, then again against the variants' manifests.
    """
    checkpoint, model_map = check(config)
    if config.options:
        return _prepare_options(config, checkpoint, model_map)
    measure = config.measure_config()
    measurement = _check_settings(load_measurement(measure.folder), measure)
    variants = _variants(measurement, checkpoint, config.measure.variant_bits)
    table = CostTable.from_variants(model_map, variants)
    options, limit = _check_budget(table, config)
    problem = Problem.build(table, options, measurement_losses(measurement))
    others = _other_estimates(measurement, checkpoint, table, options)
    return Inputs(checkpoint, model_map, measurement, variants, table, options, limit, problem, others)


def _prepare_options(config: StageConfig, checkpoint: Checkpoint, model_map: ModelMap) -> Inputs:
    """One table over options from the families' tables: variants and losses keyed by option label. The
    tables must share their calibration tokens, so their losses are comparable and one engine serves all."""
    measures = config.measure_configs()
    measurements = [_check_settings(load_measurement(m.folder), m) for m in measures]
    first = measurements[0]
    for other in measurements[1:]:
        if other.summary.data.sha256 != first.summary.data.sha256:
            raise FingerprintMismatchError(f"{other.folder} and {first.folder} were measured on other calibration "
                                           "tokens; measure every option family with the same data settings")
    variants: dict[Option, Variant] = {}
    losses: dict[str, dict[Option, float]] = {}
    for measurement, measure in zip(measurements, measures, strict=True):
        found = _variants(measurement, checkpoint, measure.variant_bits)
        labels = {bits: option_label(v.config) for bits, v in found.items()}
        variants.update({labels[bits]: v for bits, v in found.items()})
        for group, row in measurement_losses(measurement).items():
            losses.setdefault(group, {}).update({labels[b]: loss for b, loss in row.items() if b in labels})
    table = CostTable.from_variants(model_map, variants)
    options, limit = _check_budget(table, config)
    problem = Problem.build(table, options, losses)
    return Inputs(checkpoint, model_map, first, variants, table, options, limit, problem, {}, config.options)


def _other_estimates(main: Measurement, checkpoint: Checkpoint, table: CostTable,
                     options: dict[str, tuple[Option, ...]]) -> dict[str, Problem]:
    """Estimates from the other finished tables at this granularity in the work folder (e.g. a raise-mode
    table beside the drop-mode one): their solutions become extra seeds. Tables of other inputs are skipped."""
    granularity = main.summary.settings.granularity
    found: dict[str, Problem] = {}
    for folder in sorted(main.folder.parent.iterdir()):
        if folder.resolve() == main.folder.resolve() or not (folder / "table.csv").exists():
            continue
        try:
            other = load_measurement(folder)
            if other.summary.settings.granularity != granularity:
                continue
            if other.summary.variants != main.summary.variants:
                raise MixprecError("it was made from other variants")
            _variants(other, checkpoint, tuple(int(b) for b in other.summary.variants))  # checks the files
            found[folder.name] = Problem.build(table, options, measurement_losses(other))
        except MixprecError as exc:
            log.info("not seeding from %s: %s", folder, exc)
    return found


def baselines(inputs: Inputs) -> dict[str, Solution]:
    """DP at the budget, greedy, `--hq` fitted to the budget, and the best uniform recipe of the searched
    group size that fits (a seed); with `--options`, also greedy on each other family (`greedy-rtn-g128`), so
    exllamav3's rule is compared at its best group size too. The "nearest uniform at or above" baseline comes
    from `uniform_grid`."""
    problem, limit = inputs.problem, inputs.limit_bits
    # the width-based baselines run on one family (the first of --options): they are exllamav3's rules
    family = inputs.family_problem(inputs.families[0]) if inputs.families else problem
    result = {"dp": pareto_front(problem).best_under(limit), "greedy": greedy(family, limit),
              "hq": hq_at_budget(family, limit)}
    for other in inputs.families[1:]:  # exllamav3's rule knows no group sizes: it gets each family in turn
        name = f"greedy-{other.method}-g{other.group_size}"
        found = replace(greedy(inputs.family_problem(other), limit), solver=name)
        if found.cost <= limit:  # else that family's cheapest options alone exceed the budget
            result[name] = found
    fitting = [uniform(family, b) for b in sorted({option_width(o) for o in family.options[0]})]
    fitting = [s for s in fitting if s.cost <= limit]
    if fitting:
        result["uniform-fit"] = fitting[-1]
    return result


@dataclass(frozen=True)
class UniformQuant:
    """A plain uniform quant a publisher could ship instead: every searched group at one setting.

    The grid covers every measured width at every group size in `StageConfig.uniform_group_sizes`, so
    "the nearest uniform quant at or above the budget" is the one a publisher would really compare
    with (2-bit g32 is exactly 2.5 bpw), not only the widths of the searched group size. Constraints
    do not apply to it: it is the alternative to a recipe, not a recipe.
    """

    config: QuantConfig
    cost: int

    @property
    def label(self) -> str:
        method = "" if self.config.method == "rtn" else f"-{self.config.method}"
        return f"uniform-{self.config.bits}b-g{self.config.group_size}{method}"


def uniform_grid(inputs: Inputs, group_sizes: tuple[int, ...]) -> list[UniformQuant]:
    """Every uniform quant of the measured widths at each group size, cheapest first (exact storage bits):
    every measured family (each `--options` family) at its own settings, and each family whose quantizer
    needs no Hessian also at every size in `group_sizes` (the others need calibration data to be made)."""
    measured = {v.config.settings for v in inputs.variants.values()}
    widths = sorted({v.config.bits for v in inputs.variants.values()})
    families = set(measured)
    for family in measured:
        method = quantizer_class(family.method)
        if not method.needs_hessian:
            families |= {replace(family, group_size=s) for s in group_sizes if s in method.supported_group_sizes}
    groups = [inputs.model_map.group(name) for name in inputs.table.names]
    grid = []
    for family in families:
        for bits in widths:
            config = family.config(bits)
            grid.append(UniformQuant(config, sum(storage_bits(config, r.shape) for g in groups for r in g.weights)))
    return sorted(grid, key=lambda u: (u.cost, u.config.bits, u.label))


def nearest_uniform(grid: list[UniformQuant], limit_bits: int) -> UniformQuant:
    """The cheapest uniform quant whose size reaches the budget (the largest one if none does)."""
    reaching = [u for u in grid if u.cost >= limit_bits]
    return reaching[0] if reaching else grid[-1]


def _seeds_from_others(inputs: Inputs) -> list[Solution]:
    """DP, greedy and 0.69-compressed DP under every other table's estimate (losses re-scored on the main one)."""
    seeds = []
    for label, other in inputs.others.items():
        found = [pareto_front(other).best_under(inputs.limit_bits), greedy(other, inputs.limit_bits),
                 *compressed_solutions(other, inputs.limit_bits, (0.69,))]
        seeds += [inputs.problem.solution(s.assignment, f"{label}:{s.solver}") for s in found]
    return seeds


def seeds(inputs: Inputs, compared: dict[str, Solution], front_seeds: int) -> list[Solution]:
    """Everything the study starts from, in order: the DP point at the budget (the paired reference), DP and
    greedy above the lowest width, the next DP points, the baselines that fit (greedy on every option family
    too), DP under compressed estimates, block- and kind-tied solutions, and the other tables' solutions."""
    front = pareto_front(inputs.problem).near(inputs.limit_bits, front_seeds)
    fitting = [compared[k] for k in ("greedy", "hq", "uniform-fit") if k in compared]
    fitting += [v for k, v in compared.items() if k.startswith("greedy-")]  # greedy on each other option family
    limit = inputs.limit_bits
    # right after the reference: a study of few trials must still compare the recipe that avoids the lowest width
    return (front[:1] + _above_lowest_seeds(inputs) + front[1:] + fitting + _family_seeds(inputs)
            + compressed_solutions(inputs.problem, limit) + tied_solutions(inputs.problem, limit)
            + _seeds_from_others(inputs))


def _above_lowest_seeds(inputs: Inputs) -> list[Solution]:
    """DP and greedy with no group at the lowest width, where they fit the budget. The drop-one rows are least
    additive at the lowest width (each is measured with every other group at full precision, and the largest
    errors compound most), so the study always holds a recipe that avoids it and composed measurements decide:
    with llama.cpp's IQ1_M as the lowest rung the estimate's own 2.5 bpw picks were 1.18x worse than the
    search without that rung, though that recipe was still in reach."""
    widths = {option_width(o) for opts in inputs.problem.options for o in opts if o is not None}
    if len(widths) < 2:
        return []
    lowest = min(widths)
    keep = {o for opts in inputs.problem.options for o in opts if o is None or option_width(o) > lowest}
    problem = restrict(inputs.problem, keep)
    found = [greedy(problem, inputs.limit_bits)]
    try:
        found.insert(0, pareto_front(problem).best_under(inputs.limit_bits))
    except MixprecError:
        pass  # nothing above the lowest width fits the budget
    return [inputs.problem.solution(s.assignment, f"{s.solver}-above-{lowest}b") for s in found
            if s.cost <= inputs.limit_bits]


def _family_seeds(inputs: Inputs) -> list[Solution]:
    """With `--options`: the DP of each family alone (the best one-family recipe the estimate knows), so the
    joint search starts from what choosing a family per recipe would give."""
    found = []
    for family in inputs.families:
        try:
            solution = pareto_front(inputs.family_problem(family)).best_under(inputs.limit_bits)
        except MixprecError:
            continue  # this family alone cannot meet the budget
        found.append(inputs.problem.solution(solution.assignment, f"dp-{family.method}-g{family.group_size}"))
    return found
