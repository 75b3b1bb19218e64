"""Read a work folder into typed tables: variants, measurements, recipes with their comparisons, study trials.

The report, the notebook and anyone at a Python prompt read the same `WorkFolder`, so every number
they show comes from one place. Nothing here writes or computes KL: it only reads what the stages
left behind (WORK/variants/*/manifest.json, WORK/measure/*/table.csv + summary.json,
WORK/recipes/*.yaml and the Optuna studies the recipes name, plus any studies in WORK/studies/, and
WORK/demo_summary.json when `mixprec demo` compiled and re-evaluated the recipes).

A recipe records its study as the storage URL the search was given, often relative to the directory
the search ran in (`sqlite:///studies/x.db`); `resolve_storage` also looks for it next to the work
folder, so a report run from elsewhere still finds it. A recipe is data, not an instruction: its storage
is opened (and later written, when the report is attached) only when it lies under the work folder or a
folder the user named (`StudyAccess`), or is a storage URL the user named; any other is left out with a
warning, so a copied recipe can never make the report write next to someone else's database or connect
to a server.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import read_json, read_yaml
from mixprec.core.storage import open_storage
from mixprec.formats.recipe import Recipe, RecipeError
from mixprec.measure.table import Measurement, load_measurement
from mixprec.quant.variants import Variant

__all__ = ["RecipeRun", "StudyTrials", "StudyAccess", "WorkFolder", "collect", "resolve_storage", "read_study",
           "split_group", "budget_label"]

log = logging.getLogger(__name__)

_LAYER_PREFIX = re.compile(r"^layers\.(\d+)\.")


def split_group(name: str) -> tuple[int | None, str]:
    """(layer, name within the layer): `layers.3.attn.q` -> (3, "attn.q"); `lm_head` -> (None, "lm_head")."""
    match = _LAYER_PREFIX.match(name)
    return (int(match.group(1)), name[match.end():]) if match else (None, name)


def budget_label(recipe: Recipe) -> str:
    """`3bpw`, `1.5gib`, or the achieved bpw when the recipe has no budget."""
    if recipe.budget is not None:
        return f"{recipe.budget.bpw:g}bpw" if recipe.budget.bpw is not None else f"{recipe.budget.gib:g}gib"
    bpw = recipe.achieved.get("bpw")
    return f"{bpw:.3g}bpw (achieved)" if bpw is not None else "no budget"


@dataclass(frozen=True)
class RecipeRun:
    """One recipe file and what its search measured (`provenance.comparison`)."""

    path: Path
    recipe: Recipe

    @property
    def label(self) -> str:
        return self.path.stem

    @property
    def budget(self) -> str:
        return budget_label(self.recipe)

    @property
    def bpw(self) -> float | None:
        value = self.recipe.achieved.get("bpw")
        return None if value is None else float(value)

    @property
    def comparison(self) -> pd.DataFrame:
        """Held-out comparison rows (mixprec, greedy, hq, uniform...); empty when the recipe has none."""
        rows = self.recipe.provenance.get("comparison") or []
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame.insert(0, "budget", self.budget)
            frame.insert(1, "recipe_file", self.label)
        return frame

    @property
    def study(self) -> tuple[str, str] | None:
        study = self.recipe.provenance.get("study") or {}
        return (str(study["name"]), str(study["storage"])) if study.get("name") and study.get("storage") else None


@dataclass
class StudyTrials:
    """The completed trials of one Optuna study: calibration KL, its SE, the additive prediction, bpw."""

    name: str
    storage: str
    trials: pd.DataFrame
    artifact_dir: Path | None = None


@dataclass
class WorkFolder:
    """Everything the stages left in one work folder (plus extra recipe files given by the user)."""

    work_dir: Path
    variants: pd.DataFrame
    measurements: dict[str, Measurement]
    recipes: list[RecipeRun]
    studies: list[StudyTrials] = field(default_factory=list)
    missing_studies: list[str] = field(default_factory=list)
    demo: dict[str, Any] | None = None

    @property
    def measurement(self) -> Measurement | None:
        """The table the recipes were searched on (else drop mode first): the one the report plots."""
        wanted = [Path(str(r.recipe.provenance.get("measurement", {}).get("folder", ""))).name for r in self.recipes]
        for name in [*wanted, *sorted(self.measurements, key=lambda n: (not n.startswith("drop"), n))]:
            if name in self.measurements:
                return self.measurements[name]
        return None

    @property
    def model_name(self) -> str:
        if self.recipes:
            return self.recipes[0].recipe.model.name
        measurement = self.measurement
        return Path(measurement.summary.model.path).name if measurement else self.work_dir.name

    def groups(self) -> pd.DataFrame:
        """Every group of the measurement and the recipes, in model order: group, kind, layer, part, params."""
        rows: dict[str, dict[str, Any]] = {}
        measurement = self.measurement
        if measurement is not None:
            for row in measurement.table.drop_duplicates("group").itertuples():
                rows[str(row.group)] = {"kind": row.kind, "params": int(row.params)}
        for run in self.recipes:
            for name in run.recipe.groups:
                rows.setdefault(name, {"kind": "", "params": None})
        frame = pd.DataFrame([{"group": name, **info} for name, info in rows.items()],
                             columns=["group", "kind", "params"])
        split = [split_group(name) for name in frame["group"]]
        frame.insert(2, "layer", pd.array([s[0] for s in split], dtype="Int64"))
        frame.insert(3, "part", [s[1] for s in split])
        return frame

    def budgets(self) -> list[str]:
        return list(dict.fromkeys(run.budget for run in self.recipes))

    def comparison(self) -> pd.DataFrame:
        """All recipes' comparison rows stacked, with `budget` and `recipe_file` columns."""
        frames = [run.comparison for run in self.recipes if not run.comparison.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def bit_table(self) -> pd.DataFrame:
        """Groups as rows (model order), one column of bits per recipe file (NA keeps original precision; an
        option label counts as its width)."""
        table = self.groups()[["group", "kind", "layer", "part"]].set_index("group")
        for run in self.recipes:
            widths = run.recipe.widths()
            table[run.label] = pd.array([widths.get(g) for g in table.index], dtype="Int64")
        return table

    def trials(self) -> pd.DataFrame:
        frames = [s.trials.assign(study=s.name) for s in self.studies if not s.trials.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_variants(work_dir: Path) -> pd.DataFrame:
    rows = []
    for manifest in sorted((work_dir / "variants").glob("*/manifest.json")):
        variant = Variant.open(manifest.parent)
        config, totals = variant.config, variant.manifest.totals
        rows.append({"variant_id": variant.manifest.variant_id, "bits": variant.bits, "bpw": totals.bpw,
                     "params": totals.params, "method": config.method, "group_size": config.group_size,
                     "path": str(variant.path)})
    columns = ["variant_id", "bits", "bpw", "params", "method", "group_size", "path"]
    return pd.DataFrame(rows, columns=columns).sort_values("bits", ignore_index=True)


def _read_measurements(work_dir: Path) -> dict[str, Measurement]:
    found = {}
    for folder in sorted(p for p in (work_dir / "measure").glob("*") if p.is_dir()):
        if not (folder / "summary.json").exists():
            log.warning("skipping %s: the measurement is not finished (no summary.json)", folder)
            continue
        found[folder.name] = load_measurement(folder)
    return found


@dataclass(frozen=True)
class StudyAccess:
    """The study storages the user allows the report to open: files under `folders`, and the `urls` named."""

    folders: tuple[Path, ...] = ()
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for folder in self.folders:
            if Path(folder).exists() and not Path(folder).is_dir():
                raise MixprecError(f"--studies-dir {folder} is a file; give the folder holding the study storages")

    def allows_file(self, path: Path) -> bool:
        return any(path.resolve().is_relative_to(Path(f).resolve()) for f in self.folders)


def _read_recipes(work_dir: Path, extra: tuple[Path, ...]) -> list[RecipeRun]:
    paths = sorted((work_dir / "recipes").glob("*.yaml")) + [Path(p) for p in extra]
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    runs = []
    for path in unique:
        data, where = read_yaml(path, "recipe", RecipeError)
        if isinstance(data, dict) and {"sources", "overrides"} <= set(data):
            log.info("%s is an exllamav3 override YAML (search --export-exl3), not a recipe; left out", path)
            continue
        runs.append(RecipeRun(path, Recipe.from_dict(data, where)))
    return sorted(runs, key=lambda r: (r.bpw if r.bpw is not None else float("inf"), r.label))


def resolve_storage(url: str, work_dir: Path, access: StudyAccess | None = None) -> str | None:
    """The study storage as it exists from here: the URL itself, or its file found under the work folder.

    Only storages `access` allows (plus files under the work folder) are returned; None means not found
    or not allowed.
    """
    access = StudyAccess((work_dir, *(access.folders if access else ())), access.urls if access else ())
    prefix = "sqlite:///" if url.startswith("sqlite:///") else "" if "://" not in url else None
    if prefix is None:
        return url if url in access.urls else None  # a database server: only one the user named
    path = Path(url.removeprefix(prefix))
    candidates = [path] if path.is_absolute() else [path, work_dir / path, work_dir.parent / path]
    candidates.append(work_dir / "studies" / path.name)
    for candidate in candidates:
        if candidate.is_file() and access.allows_file(candidate):
            return f"{prefix}{candidate}"
    return None


_TRIAL_COLUMNS = ["number", "seed", "bpw", "kl", "kl_se", "predicted", "dkl_vs_ref", "dkl_vs_ref_se", "feasible"]


def _trial_attrs(trial: Any) -> dict[str, Any]:
    """User attrs with the search's `metrics` dict flattened (older studies stored each metric on its own)."""
    return {**trial.user_attrs, **(trial.user_attrs.get("metrics") or {})}


def _trial_row(trial: Any) -> dict[str, Any]:
    attrs = _trial_attrs(trial)
    return {"number": trial.number, "seed": attrs.get("seed", "search"), "bpw": attrs.get("bpw"),
            "kl": trial.values[0] if trial.values else None, "kl_se": attrs.get("kl_se"),
            "predicted": attrs.get("predicted"), "dkl_vs_ref": attrs.get("dkl_vs_ref"),
            "dkl_vs_ref_se": attrs.get("dkl_vs_ref_se"),
            "feasible": all(v <= 0 for v in trial.constraints.values())}


def read_study(name: str, url: str) -> StudyTrials:
    """Completed trials of study `name` in storage `url`, read with Optuna's storage API."""
    from optuna.trial import TrialState

    try:
        storage = open_storage(url, create=False)
        trials = storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False,
                                        states=(TrialState.COMPLETE,))
    except KeyError as exc:
        raise MixprecError(f"study {name!r} is not in {url}; pass the right --storage or re-run `mixprec search`") \
            from exc
    except Exception as exc:  # sqlalchemy / journal errors: name the file instead of a deep traceback
        raise MixprecError(f"cannot read study {name!r} from {url} ({exc}); is it an Optuna storage?") from exc
    frame = pd.DataFrame([_trial_row(t) for t in trials if "predicted" in _trial_attrs(t)], columns=_TRIAL_COLUMNS)
    local = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") or "://" not in url else None
    artifacts = Path(local).parent / "artifacts" if local else None
    return StudyTrials(name, url, frame, artifacts if artifacts is not None and artifacts.is_dir() else None)


def _study_names(url: str) -> list[str]:
    try:
        return [s.study_name for s in open_storage(url, create=False).get_all_studies()]
    except Exception as exc:  # sqlalchemy / journal / driver errors: one line naming the storage
        raise MixprecError(f"cannot list the studies in {url} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                           "is it a reachable Optuna storage?") from exc


def _recipe_studies(work_dir: Path, recipes: list[RecipeRun], access: StudyAccess,
                    wanted: dict[tuple[str, str], None]) -> list[str]:
    """Add each recipe's study that `access` allows to `wanted`; return the ones left out."""
    missing = []
    for run in recipes:
        if run.study is None:
            continue
        name, url = run.study
        resolved = resolve_storage(url, work_dir, access)
        if resolved is None:
            log.warning("study %r of %s is not found under the work folder or --studies-dir, nor a --storage "
                        "given (%s); its trials are left out", name, run.path, url)
            missing.append(f"{name} ({url})")
            continue
        wanted[(name, resolved)] = None
    return missing


def _read_studies(work_dir: Path, recipes: list[RecipeRun],
                  access: StudyAccess) -> tuple[list[StudyTrials], list[str]]:
    wanted: dict[tuple[str, str], None] = {}
    missing = _recipe_studies(work_dir, recipes, access, wanted)
    studies_dir = work_dir / "studies"
    for path in sorted([*studies_dir.glob("*.db"), *studies_dir.glob("*.log")]):
        url = f"sqlite:///{path}" if path.suffix == ".db" else str(path)
        if any(Path(u.removeprefix("sqlite:///")).resolve() == path.resolve() for _, u in wanted):
            continue
        for name in _study_names(url):
            wanted[(name, url)] = None
    for url in access.urls:
        for name in _study_names(url):
            wanted.setdefault((name, url), None)
    return [read_study(name, url) for name, url in wanted], missing


def collect(work_dir: str | Path, recipes: tuple[str | Path, ...] = (), studies: bool = True,
            access: StudyAccess | None = None) -> WorkFolder:
    """Read a work folder (and extra recipe files); raise if it holds nothing to report.

    Studies are read from the work folder and from what `access` allows (see `StudyAccess`)."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise MixprecError(f"work folder {work_dir} does not exist; run `mixprec quantize`/`measure`/`search` "
                           "with --work pointing there first (or pass the right --work)")
    runs = _read_recipes(work_dir, tuple(Path(p) for p in recipes))
    found, missing = _read_studies(work_dir, runs, access or StudyAccess()) if studies else ([], [])
    demo = read_json(work_dir / "demo_summary.json") if (work_dir / "demo_summary.json").is_file() else None
    folder = WorkFolder(work_dir, _read_variants(work_dir), _read_measurements(work_dir), runs, found, missing, demo)
    if not folder.measurements and not folder.recipes:
        raise MixprecError(f"{work_dir} holds no finished measurement (measure/*/summary.json) and no recipe "
                           "(recipes/*.yaml); run `mixprec measure` and `mixprec search` first, or pass --recipe")
    return folder
