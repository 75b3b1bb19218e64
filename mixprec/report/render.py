"""Write the report folder: PNG figures, an HTML page, a Markdown summary and a JSON index.

WORK/report/
    index.html     tables and figures (PNG by relative path, so the folder can be copied or served)
    summary.md     the same tables and figures for a model card or a pull request
    report.json    model, budgets, groups, figure files: what a script or test needs without parsing HTML
    figures/*.png

The folder is built in a temporary sibling and swapped in whole (`mixprec.core.fileio.atomic_dir`), so a
failed or interrupted report never leaves a page that points at missing or stale figures.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mixprec.core.errors import MixprecError
from mixprec.core.fileio import atomic_dir, atomic_write_json, atomic_write_text
from mixprec.report import figures as fig
from mixprec.report import tables
from mixprec.report.collect import StudyAccess, WorkFolder, collect
from mixprec.report.front import additive_front, base_kl

__all__ = ["ReportConfig", "FigureFile", "build_report", "render_report", "draw_figures", "attach_to_studies"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """What to report on and where; `out_dir` defaults to WORK/report."""

    work_dir: Path
    recipes: tuple[Path, ...] = ()
    out_dir: Path | None = None
    studies: bool = True
    dpi: int = 110
    access: StudyAccess = StudyAccess()

    def __post_init__(self) -> None:
        if not 50 <= self.dpi <= 400:
            raise MixprecError(f"dpi={self.dpi} is out of range; use 50..400 (110 suits a screen)")
        if self.out_dir is not None and Path(self.out_dir).resolve() == Path(self.work_dir).resolve():
            raise MixprecError(f"--out {self.out_dir} is the work folder itself; the report replaces its output "
                               "folder whole, so give a subfolder such as WORK/report")

    @property
    def out(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path(self.work_dir) / "report"


@dataclass(frozen=True)
class FigureFile:
    name: str
    title: str
    caption: str

    @property
    def path(self) -> str:
        return f"figures/{self.name}.png"


def _noise_floor(data: WorkFolder) -> float | None:
    return data.measurement.summary.noise_floor_kl("bf16_compute") if data.measurement else None


def _recipe_titles(data: WorkFolder) -> dict[str, str]:
    titles = {}
    for run in data.recipes:
        held = run.recipe.kl.get("evaluation")
        kl = f", held-out KL {held:.2e}" if held is not None else ""
        size = f"{run.bpw:.3f} bpw" if run.bpw is not None else "size unknown"
        titles[run.label] = f"{run.label} (budget {run.budget}): {size}{kl}"
    return titles


def draw_figures(data: WorkFolder, folder: Path, dpi: int = 110) -> list[FigureFile]:
    """Draw every figure the work folder has data for into `folder`; returns them in reading order."""
    folder.mkdir(parents=True, exist_ok=True)
    m, comparison, trials, model = data.measurement, data.comparison(), data.trials(), data.model_name
    drawn = []

    def keep(name: str, figure: object, title: str, caption: str) -> None:
        fig.save_png(figure, folder / f"{name}.png", dpi)  # type: ignore[arg-type]
        drawn.append(FigureFile(name, title, caption))

    if m is not None or not comparison.empty:
        front = additive_front(m) if m is not None else None
        what = "size vs held-out KL" if not comparison.empty else "size vs predicted KL (no recipes yet)"
        keep("pareto", fig.pareto_figure(front, comparison, f"{model}: {what}"), "Pareto front",
             "Held-out KL (± SE) of the chosen recipe at each budget, with exllamav3's greedy, the --hq rule and "
             "uniform recipes at their own sizes; the dashed line is the exact front of the additive estimate.")
    if data.recipes:
        keep("bitmap", fig.bit_map_figure(data.bit_table(), _recipe_titles(data), f"{model}: bits per group"),
             "Bit map", "Bit width of every group in each recipe, by layer (rows) and group within the layer.")
    if m is not None:
        keep("sensitivity", fig.sensitivity_heatmap(m.table, f"{model}: sensitivity ({m.folder.name})"),
             "Sensitivity heatmap", "End-to-end KL when only this group is quantized at this width (log colour); "
             "a blank cell is a group that layer does not have (e.g. a dense MLP layer has no experts).")
    if not trials.empty or not comparison.empty:
        offset = base_kl(m) if m is not None else 0.0  # raise mode predicts ΔKL from the base model
        trials = trials.assign(predicted=trials["predicted"] + offset) if not trials.empty else trials
        comparison = comparison.assign(predicted=comparison["predicted"] + offset) if offset else comparison
        keep("additivity", fig.additivity_figure(trials, comparison, f"{model}: is the damage additive?"),
             "Predicted vs measured KL", "Sum of single-group KLs against the composed recipe's measured KL; points "
             "on the diagonal mean the additive estimate the solver optimises is exact.")
    if m is not None:
        keep("uncertainty", fig.uncertainty_figure(m.table, _noise_floor(data), f"{model}: measurement uncertainty"),
             "Measurement uncertainty", "Every table entry with its standard error, and the bf16 noise floor: "
             "entries near the floor are ties, not rankings.")
    return drawn


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>none</em></p>"
    return frame.to_html(index=False, border=0, classes="t", escape=True, na_rep="—")


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_\n"
    cells = [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


Section = tuple[str, pd.DataFrame]


def _sections(data: WorkFolder) -> tuple[list[Section], list[Section]]:
    """Tables shown before the figures (the results) and after them (the details)."""
    compiled = tables.compiled_table(data)
    results = [("Recipes per budget", tables.budgets_table(data)),
               ("Held-out comparison", tables.comparison_table(data)),
               *([("Compiled checkpoints", compiled)] if not compiled.empty else [])]
    details = [("Bits per group", tables.bits_table(data)),
               ("Sensitivity table", tables.sensitivity_table(data)),
               ("Variants", tables.variants_table(data)),
               ("Optuna studies", tables.studies_table(data))]
    return results, details


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table.t{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}"
        "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}"
        "figure{margin:1em 0 2em}img{max-width:100%;border:1px solid #eee}figcaption{color:#555}"
        "dt{font-weight:bold;float:left;clear:left;width:11em}dd{margin-left:12em}")


def _html(data: WorkFolder, drawn: list[FigureFile]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mixprec report: {esc(data.model_name)}"
             f"</title><style>{_CSS}</style></head><body><h1>mixprec report: {esc(data.model_name)}</h1><dl>"]
    parts += [f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in tables.overview(data)]
    parts.append("</dl>")
    results, details = _sections(data)
    for title, frame in results:
        parts.append(f"<h2>{esc(title)}</h2>{_html_table(frame)}")
    parts.append("<h2>Figures</h2>")
    parts += [f"<figure id='{f.name}'><h3>{esc(f.title)}</h3><img src='{f.path}' alt='{esc(f.title)}'>"
              f"<figcaption>{esc(f.caption)}</figcaption></figure>" for f in drawn]
    for title, frame in details:
        parts.append(f"<h2>{esc(title)}</h2>{_html_table(frame)}")
    return "\n".join(parts) + "\n</body></html>\n"


def _markdown(data: WorkFolder, drawn: list[FigureFile]) -> str:
    lines = [f"# mixprec report: {data.model_name}\n"]
    lines += [f"- **{k}**: {v}" for k, v in tables.overview(data)]
    results, details = _sections(data)
    for title, frame in [*results, details[0]]:  # the summary stops at the bit table; the page has the rest
        lines += ["", f"## {title}\n", _md_table(frame)]
    lines += ["", "## Figures\n"]
    lines += [f"### {f.title}\n\n![{f.title}]({f.path})\n\n{f.caption}\n" for f in drawn]
    return "\n".join(lines)


def _index(data: WorkFolder, drawn: list[FigureFile]) -> dict[str, object]:
    return {"model": data.model_name, "work_dir": str(data.work_dir), "budgets": data.budgets(),
            "groups": data.groups()["group"].tolist(), "recipes": [str(r.path) for r in data.recipes],
            "studies": [s.name for s in data.studies],
            "figures": [{"file": f.path, "title": f.title} for f in drawn]}


def render_report(data: WorkFolder, out_dir: Path, dpi: int = 110) -> Path:
    """Write the report folder for `data` atomically; returns the path of its index.html."""
    with atomic_dir(out_dir) as tmp:
        drawn = draw_figures(data, tmp / "figures", dpi)
        atomic_write_text(tmp / "index.html", _html(data, drawn))
        atomic_write_text(tmp / "summary.md", _markdown(data, drawn))
        atomic_write_json(tmp / "report.json", _index(data, drawn))
    log.info("wrote %s (%d figures)", out_dir, len(drawn))
    return Path(out_dir) / "index.html"


def attach_to_studies(data: WorkFolder, report_dir: Path) -> int:
    """Attach the report (figures, summary.md, the study's own recipe) to each study a recipe names."""
    from mixprec.report.dashboard import attach_report, default_artifact_dir

    attached = 0
    for run in data.recipes:
        study = next((s for s in data.studies if run.study is not None and s.name == run.study[0]), None)
        artifacts = None if study is None else study.artifact_dir or default_artifact_dir(study.storage)
        if study is None or artifacts is None:
            continue
        attach_report(report_dir, study.storage, study.name, run.path, artifacts)
        attached += 1
    return attached


def build_report(work_dir: str | Path, recipes: tuple[str | Path, ...] = (), out_dir: str | Path | None = None,
                 studies: bool = True, attach: bool = True, dpi: int = 110,
                 access: StudyAccess | None = None) -> Path:
    """Read a work folder (plus extra recipe files) and write its report; returns WORK/report/index.html.

    This is what `mixprec report` and `mixprec demo` call. `studies=False` skips reading Optuna studies;
    `attach` uploads the figures, summary and recipe to each recipe's study as artifacts (idempotent)
    and shows the summary as the study's dashboard note, so `mixprec dashboard` opens them. Only studies
    under the work folder or allowed by `access` are read or written (a recipe cannot point elsewhere).
    """
    config = ReportConfig(Path(work_dir), tuple(Path(r) for r in recipes),
                          None if out_dir is None else Path(out_dir), studies, dpi, access or StudyAccess())
    data = collect(config.work_dir, config.recipes, config.studies, config.access)
    page = render_report(data, config.out, config.dpi)
    if attach and studies:
        log.info("attached the report to %d stud(ies)", attach_to_studies(data, config.out))
    return page
