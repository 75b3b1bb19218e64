"""The end-to-end demo: quantize, measure, search, compile, evaluate, write a GGUF and report on one model.

It chains the stages' own APIs exactly as a publisher would run the CLI, into one work folder:

    WORK/variants/...            uniform variants (reused when present)
    WORK/measure/drop-<gran>/    the sensitivity table
    WORK/studies/*.db            one Optuna study per budget
    WORK/recipes/*.yaml          the chosen recipe per budget (with its held-out comparison)
    WORK/compiled/<budget>/      the packed checkpoint built from each recipe
    WORK/gguf/<model>-<budget>bpw.gguf   each recipe as a GGUF (its widths as ggml K-quants), scored in llama.cpp
    WORK/demo_summary.json       the summary table below
    WORK/report/index.html       the report

The compiled checkpoint is re-evaluated independently (`mixprec.checkpoint.evaluate`) on the same held-out windows
the search used, so the table shows what a publisher would ship, not just what the search believed. The
GGUF stage maps each recipe's widths onto ggml's ladder (`as_ggml_recipe`: 2 -> Q2_K ... 8 -> Q8_0, which
cost a little more than RTN's widths), writes the file with `compile_gguf` and scores it in llama.cpp
itself on the same windows. Without llama-cpp-python (a MIXPREC_NO_GGUF=1 setup), or for a model llama.cpp
would compute differently, the stage is skipped with one line saying why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mixprec.checkpoint.compile import compile_recipe
from mixprec.checkpoint.evaluate import EvalConfig, evaluate
from mixprec.checkpoint.gguf import as_ggml_recipe, compile_gguf, gguf_types
from mixprec.checkpoint.ggufrun import GGUF_MISSING, llama_cpp_available
from mixprec.checkpoint.qformat import CompileError
from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_write_json
from mixprec.formats.recipe import Budget, Recipe
from mixprec.measure.config import MeasureConfig
from mixprec.measure.run import run_measure
from mixprec.model.data import WindowConfig
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import DEFAULT_GRANULARITY, Granularity
from mixprec.quant.base import QuantSettings
from mixprec.quant.options import parse_families
from mixprec.quant.variants import ensure_variants
from mixprec.search.inputs import StageConfig
from mixprec.search.pipeline import run_stage
from mixprec.search.study import SearchConfig

__all__ = ["DemoConfig", "gguf_skip_reason", "run_demo", "summary_rows", "gguf_note"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so the whole demo runs in about five minutes on two CPU cores."""

    work: Path = Path("work/demo")
    model: str | None = None
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    budgets: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
    granularity: str = DEFAULT_GRANULARITY
    #: drop, or split with `granularity="expert"` (per-expert widths from the fine table, `mixprec.measure.split`)
    mode: str = "drop"
    measure_windows: int = 16
    eval_windows: int = 32
    seq_len: int = 256
    trials: int = 10
    seed: int = 0
    device: str = "auto"
    report: bool = True
    gguf: bool = True
    #: Option families searched jointly per group (`--options`); the first is the one greedy and `--hq` use.
    #: Empty: every group at one group size (RTN g64), i.e. widths only.
    options: tuple[str, ...] = ("rtn-g64", "rtn-g32", "rtn-g128")

    def __post_init__(self) -> None:
        Granularity(self.granularity)
        self.families()  # validates the option labels before any work
        _measure_config(self)  # and the measurement's mode and granularity
        WindowConfig(self.seq_len, self.measure_windows)
        WindowConfig(self.seq_len, self.eval_windows)
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise MixprecError(f"budgets {self.budgets} must be positive bits per weight")
        if self.trials < 1:
            raise MixprecError(f"trials={self.trials} must be at least 1")


    @property
    def tag(self) -> str:
        """Suffix of the study, recipe and checkpoint names: empty for the default grouping, so a demo at another
        granularity or mode in the same work folder neither resumes the default's studies nor overwrites its files."""
        if (self.granularity, self.mode) == (DEFAULT_GRANULARITY, "drop"):
            return ""
        return f"-{self.granularity}" + ("-split" if self.mode == "split" else "")

    def families(self) -> tuple[QuantSettings, ...]:
        """The option families at the measurement's shared settings (symmetry, clip search)."""
        return parse_families(self.options, QuantSettings()) if self.options else ()


def _measure_config(config: DemoConfig) -> MeasureConfig:
    return MeasureConfig(work=config.work, model=config.model, mode=config.mode, bits=config.bits,
                         granularity=config.granularity, num_windows=config.measure_windows, seq_len=config.seq_len,
                         device=config.device)


def _stage_config(config: DemoConfig, budget: float, name: str) -> StageConfig:
    search = SearchConfig(trials=config.trials, seed=config.seed, study_name=f"{name}{config.tag}-{budget:g}bpw",
                          studies_dir=config.work / "studies")
    return StageConfig(work=config.work, budget=Budget(bpw=budget), model=config.model,
                       granularity=config.granularity, measure=_measure_config(config), search=search,
                       eval_windows=config.eval_windows, eval_seq_len=config.seq_len, device=config.device,
                       options=config.families())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def gguf_skip_reason(config: DemoConfig) -> str | None:
    """Why the GGUF stage cannot run for this demo, or None; checked once, before any budget."""
    if not config.gguf:
        return "turned off (--no-gguf)"
    if not llama_cpp_available():
        return GGUF_MISSING
    return None


_MIXED_EXPERTS = ("llama.cpp holds one ggml type per expert tensor (all experts of a layer's projection) and the "
                  "recipe gives its experts different widths; search at --granularity fine for a GGUF")


def _gguf_stage(config: DemoConfig, checkpoint: Checkpoint, recipe: Recipe, budget: float) -> dict[str, Any]:
    """The recipe's widths as ggml types, written as a GGUF and scored by llama.cpp on the held-out windows."""
    ggml = as_ggml_recipe(recipe)
    try:  # one ggml type per tensor: a recipe whose experts of one projection differ cannot be a GGUF
        gguf_types(ggml, checkpoint.model_map(ggml.granularity))
    except MixprecError as exc:
        log.info("GGUF stage skipped at %g bpw: %s", budget, exc)
        return {"gguf_skipped": _MIXED_EXPERTS}
    widths = sorted({b for b in ggml.groups.values() if b is not None})
    ensure_variants(checkpoint, checkpoint.model_map("layer"), [ggml.quant_config(b) for b in widths], config.work)
    out = config.work / "gguf" / f"{checkpoint.path.name}{config.tag}-{budget:g}bpw.gguf"
    try:
        report = compile_gguf(ggml, checkpoint, config.work, out)
    except CompileError as exc:
        log.warning("GGUF stage skipped: %s", exc)
        return {"gguf_skipped": str(exc)}
    scored = evaluate(out, checkpoint.path, EvalConfig(seq_len=config.seq_len, num_windows=config.eval_windows,
                                                       streaming="off"))
    return {"gguf": str(out), "gguf_bpw": report["actual"]["bpw"], "gguf_mib": out.stat().st_size / 2**20,
            "gguf_kl": scored.summary.kl_mean, "gguf_kl_se": scored.summary.kl_se,
            "gguf_same_top1": scored.summary.same_top1}


def _one_budget(config: DemoConfig, checkpoint: Checkpoint, budget: float, gguf_skip: str | None) -> dict[str, Any]:
    """Search, save, compile and independently evaluate the recipe for one budget."""
    name = checkpoint.path.name
    result = run_stage(_stage_config(config, budget, name))
    recipe_path = config.work / "recipes" / f"{name}{config.tag}-{budget:g}bpw.yaml"
    result.recipe.save(recipe_path)
    compiled = config.work / "compiled" / f"{budget:g}bpw{config.tag}"
    compile_report = compile_recipe(result.recipe, checkpoint, config.work, compiled)
    scored = evaluate(compiled, checkpoint.path, EvalConfig(seq_len=config.seq_len, num_windows=config.eval_windows))
    rows = {row["recipe"]: row for row in result.comparison}
    llama = {"gguf_skipped": gguf_skip} if gguf_skip else _gguf_stage(config, checkpoint, result.recipe, budget)
    return {**llama, "budget": budget, "recipe": str(recipe_path), "compiled": str(compiled),
            "achieved_bpw": result.recipe.achieved.get("bpw"),
            "compiled_mib": _folder_bytes(compiled) / 2**20,
            "predicted_bytes": compile_report["predicted"]["quantized_bytes"],
            "actual_bytes": compile_report["actual"]["quantized_bytes"],
            "compiled_kl": scored.summary.kl_mean, "compiled_kl_se": scored.summary.kl_se,
            "compiled_same_top1": scored.summary.same_top1, "compiled_ppl_ratio": scored.to_dict()["ppl_ratio"],
            "comparison": rows}


def _write_summary(config: DemoConfig, checkpoint: Checkpoint, timings: dict[str, float],
                   results: list[dict[str, Any]]) -> None:
    atomic_write_json(config.work / "demo_summary.json", {
        "schema_version": 1, "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "model": str(checkpoint.path), "fingerprint": checkpoint.fingerprint,
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "budgets": results})


def run_demo(config: DemoConfig) -> list[dict[str, Any]]:
    """Run every stage; returns one summary row per budget and writes WORK/demo_summary.json.

    The summary is written before the report so the report can show the compiled checkpoints, and
    rewritten afterwards with the report's timing.
    """
    started = time.perf_counter()
    checkpoint = Checkpoint.open(config.model)
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    for measure in _stage_config(config, config.budgets[0], checkpoint.path.name).measure_configs():
        run_measure(measure)  # one table per option family; quantizes the missing variants first
    timings["quantize+measure"] = time.perf_counter() - mark
    skip = gguf_skip_reason(config)
    if skip:
        log.warning("GGUF stage skipped: %s", skip)
    results = []
    for budget in config.budgets:
        mark = time.perf_counter()
        results.append(_one_budget(config, checkpoint, budget, skip))
        timings[f"budget {budget:g}"] = time.perf_counter() - mark
    _write_summary(config, checkpoint, timings, results)
    if config.report:
        from mixprec.report.render import build_report

        mark = time.perf_counter()
        page = build_report(config.work)
        timings["report"] = time.perf_counter() - mark
        log.info("report: %s", page)
    timings["total"] = time.perf_counter() - started
    _write_summary(config, checkpoint, timings, results)
    return results


def _kl(row: dict[str, Any] | None) -> str:
    return "-" if row is None else f"{row['evaluation_kl']:.3e} ({row['bpw']:.2f})"


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, object]]:
    """The demo's closing table: budget, achieved bpw, size, held-out KL of mixprec vs the baselines, and the
    recipe's GGUF (its bpw over the quantized tensors) scored by llama.cpp."""
    rows: list[dict[str, object]] = []
    for r in results:
        compared = r["comparison"]
        uniform = compared.get("uniform")
        rows.append({
            "budget": f"{r['budget']:g}", "bpw": f"{r['achieved_bpw']:.3f}", "MiB": f"{r['compiled_mib']:.2f}",
            "mixprec KL (compiled)": f"{r['compiled_kl']:.3e} ± {r['compiled_kl_se']:.1e}",
            "uniform KL (bpw)": _kl(uniform), "greedy KL (bpw)": _kl(compared.get("greedy")),
            "--hq KL (bpw)": _kl(compared.get("hq")),
            "uniform/mixprec": "-" if uniform is None else f"{uniform['evaluation_kl'] / r['compiled_kl']:.2f}x",
            "greedy/mixprec": "-" if "greedy" not in compared
            else f"{compared['greedy']['evaluation_kl'] / r['compiled_kl']:.2f}x",
            "GGUF bpw": f"{r['gguf_bpw']:.3f}" if "gguf_kl" in r else "-",
            "llama.cpp KL (GGUF)": f"{r['gguf_kl']:.3e} ± {r['gguf_kl_se']:.1e}" if "gguf_kl" in r else "-",
        })
    return rows


def gguf_note(results: list[dict[str, Any]]) -> str | None:
    """One line saying why the GGUF column is empty, or None when every budget has its llama.cpp KL."""
    reasons = sorted({r["gguf_skipped"] for r in results if r.get("gguf_skipped")})
    return f"GGUF stage skipped: {'; '.join(reasons)}" if reasons else None
