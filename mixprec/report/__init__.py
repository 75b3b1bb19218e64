"""Reports of a work folder: tables and PNG figures as HTML, Markdown and JSON (`mixprec report`).

    from mixprec.report import build_report, collect
    page = build_report("work/stdlib-moe")        # -> work/stdlib-moe/report/index.html
    data = collect("work/stdlib-moe")             # the same numbers as DataFrames, for a notebook

Modules: `collect` reads the folder, `front` rebuilds the additive Pareto front, `figures` draws
(matplotlib, the `report` extra, imported only when a figure is drawn), `tables` formats, `render`
writes. Importing this package imports no plotting library and changes no global state.
"""

from __future__ import annotations

from mixprec.report.collect import RecipeRun, StudyTrials, WorkFolder, collect
from mixprec.report.render import ReportConfig, build_report, render_report

__all__ = ["build_report", "render_report", "ReportConfig", "collect", "WorkFolder", "RecipeRun", "StudyTrials"]
