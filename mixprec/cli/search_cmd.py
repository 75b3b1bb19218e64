"""`mixprec search [MODEL] --budget 3.0`: the best recipe for a bit budget, checked on held-out text.

Reads the sensitivity table in WORK/measure/<mode>-<granularity>[-<quantizer>]/ (and runs `mixprec measure` first
when it is missing, unless --no-measure), solves the additive estimate exactly, runs an Optuna
study of composed recipes measured for real on the calibration windows (seeded with the DP solutions,
exllamav3's greedy, the --hq rule and uniform), then re-measures the chosen recipe and the baselines
on the held-out evaluation split and prints them side by side with ± standard errors and paired
differences. Writes the recipe YAML (and, with --export-exl3, an exllamav3 override YAML).

Basic:
    mixprec search --budget 3.0
    mixprec search --budget 3.5 --trials 60 --out recipes/stdlib-moe-3.5bpw.yaml
    mixprec search path/to/model --budget-gib 1.5 --floor attention=5 --pin layers.0.mlp=8

Advanced:
    --granularity fine                  one width per layer's q|kv|o and gate_up|down (default auto: per routed
                                        expert and projection for MoE models, split from the fine table)
    --group-size 64 128                 one study per quantizer group size; ships the lower calibration KL
    --study NAME --storage URL          resume or share a study (default sqlite:///studies/NAME.db)
    --multi-objective                   search KL vs bpw under the budget as a cap (Pareto front)
    --sampler local|tpe|random          proposal strategy (default local: budget-preserving moves)
    --screen 0.25 [--screen-z 2]        screen proposals on a quarter of the windows; prune those clearly worse
    --select same                       compare recipes on the measurement's own windows (default auto: between them)
    --export-exl3 FILE --exl3-source 4=/quants/4.0bpw ...   exllamav3 override YAML
    --export-llama-quantize FILE        llama-quantize --tensor-type-file (recipes of --method gguf*)
    --streaming on --max-memory 24GB    one layer's weights resident at a time, caches within 24 GB
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.checkpoint.compile import open_variants
from mixprec.checkpoint.gguf import llama_quantize_types
from mixprec.checkpoint.shards import parse_size
from mixprec.cli.auto import AUTO, GRANULARITY_CHOICES, resolve_granularity, resolve_options
from mixprec.cli.checks import check_out_file, check_storage_arg, check_windows, is_override_file, is_recipe_file
from mixprec.cli.common import add_model_argument, add_work_argument, default_work_dir, print_table
from mixprec.cli.quantize_cmd import add_calibration_arguments, quantize_calibrated
from mixprec.core.errors import MixprecError, QuantConfigError
from mixprec.formats.exl3 import recipe_to_exl3
from mixprec.formats.llamacpp import is_tensor_type_file, write_tensor_type_file
from mixprec.formats.recipe import Budget, Recipe
from mixprec.measure.config import MODES, MeasureConfig
from mixprec.model.loading import resolve_model_path
from mixprec.model.streaming import STREAMING_MODES
from mixprec.quant import SUPPORTED_GROUP_SIZES, QuantSettings, quantizer_class, quantizer_names
from mixprec.quant.ggml import GGMLQuantizer
from mixprec.quant.options import option_width, parse_families
from mixprec.search.costs import Constraints, parse_settings
from mixprec.search.inputs import SELECT_MODES, Inputs, StageConfig, check, measure_missing, prepare, unmeasured
from mixprec.search.pipeline import StageResult, run_stage, run_stages
from mixprec.search.study import SAMPLERS, SearchConfig, quiet_optuna
from mixprec.search.sweep import run_budgets

__all__ = ["register", "config_from_args", "configs_from_args"]


def _add_basic(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_work_argument(parser)
    parser.add_argument("--budget", type=float, nargs="+", default=None, metavar="BPW",
                        help="average bits per quantized weight, scales counted (e.g. 3.0); several budgets "
                             "(e.g. 2.5 3.0 3.5) run one linked sweep: each seeded with its neighbours' recipes, "
                             "and a larger budget never ships a recipe worse than a smaller one's")
    parser.add_argument("--budget-gib", type=float, default=None, metavar="GIB",
                        help="total size of the quantized weights in GiB (instead of --budget)")
    parser.add_argument("--trials", type=int, default=40,
                        help="real-KL trials in the study, completed or pruned by --screen (default 40)")
    parser.add_argument("--floor", nargs="+", default=[], metavar="SEL=BITS",
                        help="minimum bits by group, kind or glob, e.g. attention=5 'layers.0.*=4'")
    parser.add_argument("--ceiling", nargs="+", default=[], metavar="SEL=BITS", help="maximum bits, same selectors")
    parser.add_argument("--pin", nargs="+", default=[], metavar="SEL=BITS",
                        help="fix groups to a width (or null: keep original precision, counted at 16 bits/weight)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the study (default 0)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="recipe YAML to write (default recipes/<model>-<budget>.yaml; a folder with several "
                             "budgets)")
    parser.add_argument("--export-exl3", type=Path, default=None, metavar="FILE",
                        help="also write an exllamav3 override YAML (a folder with several budgets)")
    parser.add_argument("--export-llama-quantize", type=Path, default=None, metavar="FILE",
                        help="also write a llama-quantize --tensor-type-file reproducing the recipe's ggml types "
                             "from an F16/BF16 GGUF with --pure (needs --method gguf, gguf-imatrix or gguf-iq; "
                             "a folder with several budgets)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out / --export-exl3 even if they are files mixprec did not write")
    parser.add_argument("--gain", action="store_true",
                        help="also measure every uniform quant on the held-out text and report each recipe's "
                             "equivalent uniform bpw gain")


def _add_advanced(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("advanced")
    _add_table_flags(group)
    _add_study_flags(group)


def _add_table_flags(group: argparse._ArgumentGroup) -> None:
    """Which measurement tables the search reads: groups, widths, quantizer families."""
    group.add_argument("--granularity", choices=GRANULARITY_CHOICES, default=AUTO,
                       help="search granularity; the measurement must be at the same one (default auto: "
                            "expert-fine split from the fine table for MoE models, fine with ggml types, "
                            "--export-exl3 or a dense model)")
    group.add_argument("--mode", choices=list(MODES), default=None,
                       help="which measurement table to read (split: per-expert rows split from the fine table, "
                            "with --granularity expert or expert-fine; default: split where --granularity auto "
                            "picks expert-fine, else drop)")
    group.add_argument("--base-bits", type=int, default=2, help="raise-mode measurement base width (default 2)")
    group.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], metavar="B",
                       help="widths of the measurement; gguf-iq also has 1 (IQ1_M) (default 2 3 4 5 6 8)")
    group.add_argument("--group-size", type=int, nargs="+", default=None, choices=SUPPORTED_GROUP_SIZES,
                       metavar="G", help="quantizer group size, one for the whole recipe (default: GPTQ at 64, 32 "
                                         "and 128 chosen per group, see --options); several (e.g. 64 128) run "
                                         "one measurement and study each and ship the recipe with the lowest "
                                         "calibration KL")
    group.add_argument("--method", default=QuantSettings.method, choices=quantizer_names(),
                       help=f"quantizer (default {QuantSettings.method})")
    group.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=QuantSettings.clip_search,
                       help="RTN per-group MSE clipping search (default off)")
    group.add_argument("--options", nargs="*", default=None, metavar="FAMILY",
                       help="search options beyond bits: each group picks width, method and group size jointly "
                            "among these families, each at every --bits width, e.g. rtn-g32 rtn-g128 gptq-g64 "
                            "(default gptq-g64 gptq-g32 gptq-g128, RTN at those sizes where GPTQ cannot run, unless "
                            "--method or --group-size is given; no family: one group size) (measured one table "
                            "per family; missing GPTQ variants are quantized first with the calibration flags)")



def _add_study_flags(group: argparse._ArgumentGroup) -> None:
    """Baselines, windows, the study and where things run."""
    group.add_argument("--uniform-group-sizes", type=int, nargs="+", default=list(SUPPORTED_GROUP_SIZES),
                       metavar="G", help="group sizes of the uniform quants the nearest-uniform baseline is picked "
                                         f"from (default {' '.join(map(str, SUPPORTED_GROUP_SIZES))})")
    group.add_argument("--windows", type=int, default=32, help="calibration windows of the measurement (default 32)")
    group.add_argument("--eval-windows", type=int, default=32, help="held-out evaluation windows (default 32)")
    group.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    group.add_argument("--eval-data", type=Path, nargs="+", default=None, metavar="FILE",
                       help="held-out text files (default: the model folder's evaluation split)")
    group.add_argument("--no-measure", action="store_true", help="fail instead of measuring a missing table")
    group.add_argument("--study", default=None, help="study name (default derived from model, budget, granularity)")
    group.add_argument("--storage", default=None, metavar="URL", help="Optuna storage URL or journal file path")
    group.add_argument("--studies-dir", type=Path, default=Path("studies"), help="default storage and artifacts")
    group.add_argument("--sampler", choices=SAMPLERS, default="local", help="proposal strategy (default local)")
    group.add_argument("--multi-objective", action="store_true", help="minimise KL and bpw (budget is a cap)")
    group.add_argument("--select", choices=list(SELECT_MODES), default="auto",
                       help="windows the study and the shipping choice compare recipes on: the measurement's "
                            "(same) or the ones halfway between them (between), which the table never saw, so "
                            "recipes fitted to its noise do not win by it; auto (default): between when the text "
                            "holds twice the measurement's windows")
    group.add_argument("--screen", type=float, default=0.0, metavar="F",
                       help="score each proposal of the study on this fraction of the calibration windows first "
                            "(whole chunks of 8) and stop it there when the best trial beats it by more than "
                            "--screen-z paired SEs; survivors get the rest (default 0: off)")
    group.add_argument("--screen-z", type=float, default=2.0, metavar="Z",
                       help="paired standard errors by which a screened proposal must lose to be pruned (default 2)")
    group.add_argument("--exl3-source", nargs="+", default=[], metavar="BITS=DIR",
                       help="exllamav3 quant folder per width (default: the mixprec variant folders)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="engine device")
    group.add_argument("--streaming", choices=STREAMING_MODES, default="auto",
                       help="read each layer's weights from the checkpoint only while it runs (on), load the whole "
                            "model (off), or stream when the fp32 model exceeds half of --max-memory (default auto); "
                            "also used by the measure step")
    group.add_argument("--max-memory", default=None, metavar="SIZE", type=parse_size,
                       help="memory budget shared by the engines' caches, e.g. 24GB (default: the RAM / VRAM "
                            "available when the model is opened)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="find the best recipe for a bit budget",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_basic(parser)
    _add_advanced(parser)
    add_calibration_arguments(parser, streaming=False)
    parser.set_defaults(run=run)


def _budgets(args: argparse.Namespace) -> list[Budget]:
    if (args.budget is None) == (args.budget_gib is None):
        raise MixprecError("give exactly one of --budget BPW or --budget-gib GIB")
    if args.budget is None:
        return [Budget(gib=args.budget_gib)]
    budgets = [Budget(bpw=b) for b in dict.fromkeys(args.budget)]
    if len(budgets) > 1 and len(dict.fromkeys(args.group_size or [64])) > 1:
        raise MixprecError("several --budget values run one linked sweep at one --group-size; give one group size")
    return budgets


def _out_paths(args: argparse.Namespace, budget: Budget) -> tuple[Path, Path | None]:
    """Recipe and exllamav3 files of one budget: `--out` / `--export-exl3` (folders holding
    <model>-<budget>.yaml / .exl3.yaml with several budgets), else recipes/<model>-<budget>.yaml."""
    name = f"{resolve_model_path(args.model).resolve().name}-{_label(budget)}"
    sweep = len(_budgets(args)) > 1
    out = (args.out / f"{name}.yaml" if sweep else args.out) if args.out else Path("recipes") / f"{name}.yaml"
    exl3 = args.export_exl3 / f"{name}.exl3.yaml" if sweep and args.export_exl3 else args.export_exl3
    return out, exl3


def _llama_path(args: argparse.Namespace, budget: Budget) -> Path | None:
    """The tensor-type file of one budget (`<model>-<budget>.tensor-types.txt` in a folder with several)."""
    if args.export_llama_quantize is None or len(_budgets(args)) == 1:
        return args.export_llama_quantize
    name = f"{resolve_model_path(args.model).resolve().name}-{_label(budget)}"
    return args.export_llama_quantize / f"{name}.tensor-types.txt"


def _label(budget: Budget) -> str:
    return f"{budget.bpw}bpw" if budget.bpw is not None else f"{budget.gib}gib"


def config_from_args(args: argparse.Namespace, group_size: int | None = None,
                     budget: Budget | None = None) -> StageConfig:
    """Validated stage configuration for one group size and budget (default: the first given); raises
    MixprecError on bad values, before any model is loaded."""
    resolve_granularity(args)
    resolve_options(args, [64])
    budget = budget or _budgets(args)[0]
    sizes = list(dict.fromkeys(args.group_size))
    size = sizes[0] if group_size is None else group_size
    work = default_work_dir(args.model, args.work)
    name = resolve_model_path(args.model).name
    study = args.study or f"{name}-{args.granularity}-{_label(budget)}-s{args.seed}"
    if not args.study and args.select != "auto":
        study = f"{study}-{args.select}"  # trials measured on other windows are another study
    if not args.study and args.mode != "drop":
        study = f"{study}-{args.mode}"  # another table (raise, split) is another study
    if not args.study and 0 < args.screen < 1:
        study = f"{study}-screen{args.screen:g}"  # a screened study is another study: its trials stop early
    if args.study and len(_budgets(args)) > 1:
        study = f"{args.study}-{_label(budget)}"  # one study per budget of a sweep
    if len(sizes) > 1 or (size != 64 and not args.study):
        study = f"{study}-g{size}"  # one study per group size
    quant = QuantSettings(method=args.method, group_size=size, clip_search=args.clip_search)
    families = parse_families(args.options, quant) if args.options else ()
    if families:
        if len(sizes) > 1:
            raise MixprecError("--options picks the group size per group; give the sizes as option families "
                               "(e.g. --options rtn-g32 rtn-g64 rtn-g128) instead of several --group-size")
        quant = families[0]
        study = f"{study}-o" + "-".join(f"{f.method}{f.group_size}" for f in families)  # one study per option set
    measure = MeasureConfig(work=work, model=args.model, mode=args.mode, bits=tuple(args.bits),
                            base_bits=args.base_bits, granularity=args.granularity, num_windows=args.windows,
                            seq_len=args.seq_len, device=args.device, streaming=args.streaming,
                            max_memory=args.max_memory, quant=quant)
    constraints = Constraints(pins=parse_settings(args.pin, "--pin", allow_null=True),
                              floors=parse_settings(args.floor, "--floor"),  # type: ignore[arg-type]
                              ceilings=parse_settings(args.ceiling, "--ceiling"))  # type: ignore[arg-type]
    search = SearchConfig(trials=args.trials, seed=args.seed, study_name=study, storage=args.storage,
                          studies_dir=args.studies_dir, sampler=args.sampler, multi_objective=args.multi_objective,
                          screen=args.screen, screen_z=args.screen_z)
    return StageConfig(work=work, budget=budget, model=args.model, granularity=args.granularity, measure=measure,
                       constraints=constraints, search=search, eval_windows=args.eval_windows,
                       eval_seq_len=args.seq_len, eval_files=tuple(args.eval_data or ()), device=args.device,
                       uniform_group_sizes=tuple(dict.fromkeys(args.uniform_group_sizes)), gain_curve=args.gain,
                       options=families, select=args.select)


def configs_from_args(args: argparse.Namespace) -> list[StageConfig]:
    """One stage configuration per requested group size (one budget) or per budget (one group size)."""
    resolve_options(args, [64])
    budgets = _budgets(args)
    if len(budgets) > 1:
        return [config_from_args(args, budget=b) for b in budgets]
    return [config_from_args(args, size) for size in dict.fromkeys(args.group_size)]


def _fmt(value: float, se: float) -> str:
    return f"{value:.3e} ± {se:.1e}"


def _print(rows: list[dict[str, object]], budget: Budget) -> None:
    print(f"held-out KL(ref||q) at budget {_label(budget)} (mean ± se over sequences; diff is paired vs mixprec):")
    table = [{"recipe": r["recipe"], "solver": r["solver"], "bpw": f"{r['bpw']:.4f}",
              "predicted": "-" if r["predicted"] is None else f"{r['predicted']:.3e}",
              "calibration": _fmt(r["calibration_kl"], r["calibration_se"]),  # type: ignore[arg-type]
              "cal. diff": f"{r['calibration_diff']:+.2e} ± {r['calibration_diff_se']:.1e}",
              "evaluation": _fmt(r["evaluation_kl"], r["evaluation_se"]),  # type: ignore[arg-type]
              "diff vs mixprec": f"{r['diff_vs_mixprec']:+.2e} ± {r['diff_se']:.1e}",
              "ratio": f"{r['ratio_vs_mixprec']:.2f}x",
              **({"gain": f"{r['gain']:+.2f} ± {r['gain_se']:.2f}{' (extrap.)' if r['extrapolated'] else ''}"}
                 if "gain" in r else {})} for r in rows]
    print_table(table, list(table[0]))


def _exl3_sources(items: list[str]) -> dict[int, str]:
    sources = {}
    for item in items:
        bits, sep, folder = item.partition("=")
        if not sep or not bits.isdigit() or not folder:
            raise MixprecError(f"--exl3-source {item!r}: expected BITS=DIR, e.g. --exl3-source 4=/quants/4.0bpw")
        sources[int(bits)] = str(Path(folder).resolve())  # absolute: the YAML may be compiled from elsewhere
    return sources


def run(args: argparse.Namespace) -> int:
    check_windows(args.model, args.seq_len)
    check_storage_arg(args.storage)
    for budget in _budgets(args):
        out, exl3 = _out_paths(args, budget)
        check_out_file(out, "--out", is_recipe_file, args.force)
        check_out_file(exl3, "--export-exl3", is_override_file, args.force)
        check_out_file(_llama_path(args, budget), "--export-llama-quantize", is_tensor_type_file, args.force)
    if args.export_llama_quantize is not None and not issubclass(quantizer_class(args.method), GGMLQuantizer):
        raise QuantConfigError(f"--export-llama-quantize needs ggml types: search with --method gguf (or "
                               f"gguf-imatrix, gguf-iq), not --method {args.method}")
    configs = configs_from_args(args)
    if not args.verbose:
        quiet_optuna()
    sources = _exl3_sources(args.exl3_source)  # every flag is validated before the long part
    for config in configs:
        check(config)
    if not args.no_measure:
        measures = [m for c in configs for m in unmeasured(c)]  # finished tables need no (GPTQ) variants made
        if measures:
            quantize_calibrated(args, [m.quant_config(b) for m in measures for b in m.variant_bits],
                                measures[0].variant_kinds, configs[0].work)
        for config in configs:
            measure_missing(config)  # the explicit measure step (`mixprec measure` with the same settings)
    inputs = [prepare(c) for c in configs]
    sweep = len({c.budget for c in configs}) > 1
    if sweep:
        results = run_budgets(configs, inputs)
    else:
        results = [run_stage(configs[0], inputs[0]) if len(configs) == 1 else run_stages(configs, inputs)]
    for config, prepared, result in zip(configs, inputs, results, strict=False):
        _write(args, config, prepared, result, sources)
    return 0


def _write_exl3(recipe: Recipe, inputs: Inputs, config: StageConfig, sources: dict[int, str], out: Path) -> None:
    """exllamav3 overrides hold one width per group: option labels are mapped to their widths (exllamav3 quantizes
    with its own trellis, so a group size or method has no meaning there), and said so."""
    variants = open_variants(recipe, inputs.checkpoint, config.work)
    dirs = sources or {option_width(k): str(Path(v.path).resolve()) for k, v in sorted(variants.items(), key=_key)}
    recipe_to_exl3(recipe.widths(), inputs.model_map, dirs).save(out)
    if recipe.uses_options and not sources:
        print("note: exllamav3 holds bits only; the recipe's options were mapped to their widths (group size "
              "and method dropped), with one variant folder per width as its source (give --exl3-source)")
    print(f"wrote {out}")


def _key(item: tuple[object, object]) -> str:
    return str(item[0])


def _write(args: argparse.Namespace, config: StageConfig, inputs: Inputs, result: StageResult,
           sources: dict[int, str]) -> None:
    """Print one budget's comparison and write its recipe (and exllamav3 overrides)."""
    _print(result.comparison, config.budget)
    out, exl3 = _out_paths(args, config.budget)
    result.recipe.save(out)
    print(f"wrote {out} (group size {result.recipe.quantizer.group_size}; shipped {result.cost.get('shipped')}; "
          f"study {result.search.study_name} in {result.search.storage_url})")
    cost = result.cost
    if cost.get("study_pruned"):
        print(f"study: {cost['study_trials']:.0f} trials completed, {cost['study_pruned']:.0f} pruned by screening, "
              f"{cost['study_token_layers']:.3g} calibration token-layers")
    if exl3 is not None:
        _write_exl3(result.recipe, inputs, config, sources, exl3)
    llama = _llama_path(args, config.budget)
    if llama is not None:
        write_tensor_type_file(str(llama), llama_quantize_types(result.recipe, inputs.checkpoint))
        print(f"wrote {llama}")
