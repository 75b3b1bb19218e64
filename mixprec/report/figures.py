"""The report's figures, one function per figure, each returning a matplotlib `Figure`.

matplotlib is the optional `report` extra: it is imported inside `_figure`, never at module import,
and only the object-oriented API is used (a `Figure` with its own Agg canvas, no pyplot), so drawing
a report changes no global backend or state of the caller's process (a notebook keeps its own).
Every axis is named, every plot has a title, KL axes are logarithmic (values span decades between
2 and 8 bits), and means carry their standard error as error bars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mixprec.core.errors import MixprecError
from mixprec.report.collect import split_group

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["sensitivity_heatmap", "pareto_figure", "bit_map_figure", "additivity_figure", "uncertainty_figure",
           "save_png", "layer_grid"]

KL_LABEL = "KL(ref ‖ quant)"
_MARKERS = {"mixprec": "o", "greedy": "s", "hq": "^", "uniform": "D"}


def _figure(width: float, height: float) -> Figure:
    """A new figure on its own Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MixprecError("the report needs matplotlib: pip install 'mixprec[report]'") from exc
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path, dpi: int = 110) -> Path:
    figure.savefig(path, dpi=dpi, format="png")
    return path


def _log_kl(ax: Any, axis: str = "y") -> None:
    """Log scale that also labels 2x and 5x ticks when the data span under two decades (a bare 1e-4, 1e-3 is
    hard to read off)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    target.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 2)))


def layer_grid(names: Sequence[str], values: Sequence[float]) -> tuple[np.ndarray, list[str], list[str]]:
    """Arrange per-group values as layers (rows) x group-within-layer (columns); absent cells are NaN."""
    cells = [split_group(n) for n in names]
    rows = list(dict.fromkeys(layer for layer, _ in cells))
    cols = list(dict.fromkeys(part for _, part in cells))
    grid = np.full((len(rows), len(cols)), np.nan)
    for (layer, part), value in zip(cells, values, strict=True):
        grid[rows.index(layer), cols.index(part)] = np.nan if value is None or pd.isna(value) else float(value)
    return grid, ["—" if r is None else f"L{r}" for r in rows], cols


def _annotate(ax: Any, grid: np.ndarray, text: Any, dark: Any, size: float) -> None:
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, text(value), ha="center", va="center", fontsize=size,
                    color="white" if dark(value) else "black")


def _panel_size(rows: int, cols: int, cell_w: float, cell_h: float) -> tuple[float, float]:
    """Inches of one layer x group panel: cells shrink on deep or wide models so a figure stays under ~20 in."""
    return min(cell_w * cols, 16.0), min(cell_h * rows, 9.0)


def _grid_axes(ax: Any, rows: list[str], cols: list[str]) -> None:
    xstep, ystep = max(1, len(cols) // 40), max(1, len(rows) // 40)  # thin labels that would overlap
    ax.set_xticks(range(0, len(cols), xstep), cols[::xstep], rotation=45, ha="right")
    ax.set_yticks(range(0, len(rows), ystep), rows[::ystep])
    ax.set_xlabel("group within layer")
    ax.set_ylabel("layer")


def sensitivity_heatmap(table: pd.DataFrame, title: str) -> Figure:
    """Per bit width, a layer x group heatmap of the measured KL (drop) or KL reduction (raise), log colour."""
    from matplotlib.colors import LogNorm

    raise_mode = str(table["mode"].iloc[0]) == "raise"
    values = (-table["dkl"] if raise_mode else table["dkl"]).astype(float)
    positive = values[values > 0]
    low, high = (positive.min(), positive.max()) if len(positive) else (1e-9, 1e-8)
    norm = LogNorm(vmin=low, vmax=max(high, low * 10))
    bits = sorted(table["bits"].unique())
    ncols = min(3, len(bits))
    nrows = math.ceil(len(bits) / ncols)
    _, rows, cols = layer_grid(table["group"].unique().tolist(), [0.0] * table["group"].nunique())
    width, height = _panel_size(len(rows), len(cols), 0.5, 0.45)
    figure = _figure(max(7.0, 1.0 + ncols * (1.0 + width)), 1.2 + nrows * (1.8 + height))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, b in zip(axes.flat, bits, strict=False):
        part = table[table["bits"] == b]
        grid, rows, cols = layer_grid(part["group"].tolist(), values[part.index].clip(lower=low).tolist())
        image = ax.imshow(grid, cmap="magma_r", norm=norm, aspect="auto")
        if grid.size <= 80:
            _annotate(ax, grid, lambda v: f"{v:.1e}", lambda v: norm(v) > 0.6, 7)
        _grid_axes(ax, rows, cols)
        ax.set_title(f"{b}-bit")
    for ax in axes.flat[len(bits):]:
        ax.set_visible(False)
    label = "KL reduction (log)" if raise_mode else f"{KL_LABEL} (log)"
    figure.colorbar(image, ax=axes, label=label, shrink=0.9)
    what = ("KL reduction when one group is raised from the base width" if raise_mode
            else "KL when one group alone is quantized (the rest unquantized)")
    figure.suptitle(f"{title}\n{what}")
    return figure


def _family(recipe: str) -> str:
    return "uniform" if recipe.startswith("uniform") else recipe


def _errorbar(ax: Any, frame: pd.DataFrame, label: str, marker: str, **style: Any) -> None:
    ax.errorbar(frame["bpw"], frame["evaluation_kl"], yerr=frame["evaluation_se"], marker=marker, capsize=3,
                label=label, **{"markersize": 6, **style})


def _recipes(ax: Any, comparison: pd.DataFrame) -> None:
    """Held-out points: mixprec per budget (joined, hollow so an identical baseline shows through), baselines."""
    frame = comparison.assign(family=comparison["recipe"].map(_family))
    ours = frame[frame["family"] == "mixprec"].sort_values("bpw")
    _errorbar(ax, ours, "mixprec (held-out, ± SE)", "o", linestyle="-", linewidth=1.8, color="C0", zorder=5,
              markerfacecolor="none", markersize=10, markeredgewidth=2)
    for budget, row in zip(ours["budget"], ours.itertuples(), strict=True):
        ax.annotate(budget, (row.bpw, row.evaluation_kl), textcoords="offset points", xytext=(8, 6), fontsize=8,
                    color="C0")
    for i, family in enumerate(["greedy", "hq", "uniform"]):
        part = frame[frame["family"] == family].drop_duplicates(["solver", "bpw"]).sort_values("bpw")
        if not part.empty:
            name = {"hq": "--hq rule", "greedy": "exllamav3 greedy"}.get(family, family)
            _errorbar(ax, part, f"{name} (held-out)", _MARKERS[family], linestyle="none", color=f"C{i + 1}")
        if family == "uniform":
            for row in part.itertuples():
                ax.annotate(str(row.solver), (row.bpw, row.evaluation_kl), textcoords="offset points",
                            xytext=(6, -10), fontsize=8, color="C3")


def _zoom(ax: Any, front: pd.DataFrame | None, comparison: pd.DataFrame) -> None:
    """Limit a panel to the compared recipes' sizes (± a margin), with y fitted to what is visible there."""
    low, high = comparison["bpw"].min() - 0.15, comparison["bpw"].max() + 0.15
    values = [*(comparison["evaluation_kl"] - comparison["evaluation_se"]),
              *(comparison["evaluation_kl"] + comparison["evaluation_se"])]
    if front is not None:
        values += front.loc[front["bpw"].between(low, high), "predicted"].tolist()
    values = [v for v in values if v > 0]
    ax.set_xlim(low, high)
    if values:
        ax.set_ylim(min(values) / 1.3, max(values) * 1.3)


def pareto_figure(front: pd.DataFrame | None, comparison: pd.DataFrame, title: str) -> Figure:
    """bpw vs held-out KL of every recipe compared, over the additive DP front; with recipes, a second panel
    zooms in on their sizes, where the differences between recipes are."""
    panels = 1 if comparison.empty else 2
    figure = _figure(8.0 if panels == 1 else 13.0, 5.2)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for i, ax in enumerate(axes):
        if front is not None and not front.empty:
            ax.plot(front["bpw"], front["predicted"], color="0.6", linestyle="--", linewidth=1.2,
                    label="additive estimate, exact DP front (calibration table)")
        if not comparison.empty:
            _recipes(ax, comparison)
        _log_kl(ax)
        ax.set_xlabel("bits per weight (scales included)")
        ax.set_ylabel(f"{KL_LABEL}, held-out split (log)" if panels == 2 else f"predicted {KL_LABEL} (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("every size" if i == 0 else "around the budgets")
    if panels == 2:
        _zoom(axes[1], front, comparison)
    axes[-1].legend(fontsize=8)
    figure.suptitle(title)
    return figure


def bit_map_figure(bits: pd.DataFrame, titles: dict[str, str], title: str) -> Figure:
    """One panel per recipe column of `bits` (groups as index): layers x group-within-layer, cells = bit width."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    recipes = [c for c in bits.columns if c in titles]
    kept = {16} if any(bits[c].isna().any() for c in recipes) else set()  # null = original precision
    levels = sorted({int(v) for c in recipes for v in bits[c].dropna()} | kept)
    colours = ListedColormap([_viridis(i / max(1, len(levels) - 1)) for i in range(len(levels))])
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
    _, rows, cols = layer_grid(bits.index.tolist(), [0.0] * len(bits))
    width, height = _panel_size(len(rows), len(cols), 0.7, 0.42)
    figure = _figure(max(6.0, 1.5 + width), 1.0 + len(recipes) * (1.0 + height))
    axes = figure.subplots(len(recipes), 1, squeeze=False)[:, 0]
    image = None
    for ax, recipe in zip(axes, recipes, strict=True):
        widths = [16 if pd.isna(v) else int(v) for v in bits[recipe]]
        grid, rows, cols = layer_grid(bits.index.tolist(), [levels.index(w) for w in widths])
        image = ax.imshow(grid, cmap=colours, norm=norm, aspect="auto")
        if grid.size <= 300:
            _annotate(ax, grid, lambda v: "fp" if levels[int(v)] == 16 else str(levels[int(v)]),
                      lambda v: v < len(levels) / 2, 9)
        _grid_axes(ax, rows, cols)
        ax.set_title(titles[recipe], fontsize=10)
    bar = figure.colorbar(image, ax=axes, ticks=range(len(levels)), shrink=0.9)
    bar.ax.set_yticklabels(["16 (kept)" if v == 16 else str(v) for v in levels])
    bar.set_label("bits per weight of the group")
    figure.suptitle(title)
    return figure


def _viridis(x: float) -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"](x)


def additivity_figure(trials: pd.DataFrame, comparison: pd.DataFrame, title: str) -> Figure:
    """Predicted (sum of single-group KLs) vs measured KL of composed recipes; the diagonal is perfect additivity."""
    figure = _figure(7.0, 5.6)
    ax = figure.subplots()
    points = []
    if not trials.empty:
        seeded = trials["seed"] != "search"
        for mask, label, colour in ((seeded, "seeded study trials (calibration)", "C1"),
                                    (~seeded, "searched study trials (calibration)", "C0")):
            part = trials[mask]
            if part.empty:
                continue
            ax.errorbar(part["predicted"], part["kl"], yerr=part["kl_se"], marker="o", linestyle="none",
                        capsize=2, markersize=4, alpha=0.75, color=colour, label=label)
        points.append(trials[["predicted", "kl"]].to_numpy(dtype=float))
    if not comparison.empty:
        held = comparison.drop_duplicates(["solver", "bpw"])
        held = held[held["predicted"].notna()]  # a uniform quant at another group size has no estimate
        ax.errorbar(held["predicted"], held["evaluation_kl"], yerr=held["evaluation_se"], marker="x",
                    linestyle="none", capsize=2, markersize=7, color="C3", label="compared recipes (held-out)")
        points.append(held[["predicted", "evaluation_kl"]].to_numpy(dtype=float))
    if points:
        every = np.concatenate(points)
        every = every[(every > 0).all(axis=1)]
        if every.size:
            low, high = every.min() / 1.5, every.max() * 1.5
            ax.plot([low, high], [low, high], color="0.4", linestyle="--", linewidth=1, label="measured = predicted")
            ratio = np.median(every[:, 1] / every[:, 0])
            ax.text(0.02, 0.97, f"median measured / predicted = {ratio:.2f} over all {len(every)} points",
                    transform=ax.transAxes, va="top", fontsize=9)
    _log_kl(ax, "x")
    _log_kl(ax)
    ax.set_xlabel(f"predicted {KL_LABEL}: sum of single-group KLs (log)")
    ax.set_ylabel(f"measured {KL_LABEL} of the composed recipe (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return figure


def uncertainty_figure(table: pd.DataFrame, noise_floor: float | None, title: str) -> Figure:
    """Left: every table entry with ± SE and the bf16 noise floor; right: relative SE against the KL itself."""
    groups = list(dict.fromkeys(table["group"]))
    bits = sorted(table["bits"].unique())
    figure = _figure(min(max(9.0, 4.0 + 0.32 * len(groups)), 20.0), 5.4)
    left, right = figure.subplots(1, 2, width_ratios=[max(2.0, len(groups) / 8), 1.2])
    value = table["dkl"].abs().astype(float)
    for i, b in enumerate(bits):
        part = table[table["bits"] == b]
        x = np.array([groups.index(g) for g in part["group"]]) + (i - (len(bits) - 1) / 2) * 0.8 / len(bits)
        left.errorbar(x, value[part.index], yerr=part["dkl_se"], marker="o", markersize=3, linestyle="none",
                      capsize=2, color=f"C{i}", label=f"{b}-bit")
        rel = part["dkl_se"] / value[part.index].where(value[part.index] > 0)
        right.scatter(value[part.index], rel, s=14, color=f"C{i}", label=f"{b}-bit")
    if noise_floor:
        for ax in (left, right):
            line = ax.axhline if ax is left else ax.axvline
            line(noise_floor, color="0.3", linestyle=":", linewidth=1.2, label="bf16 noise floor")
    step = max(1, len(groups) // 40)
    left.set_xticks(range(0, len(groups), step), groups[::step], rotation=90, fontsize=7)
    _log_kl(left)
    left.set_xlabel("group (model order)")
    left.set_ylabel(f"|ΔKL| per entry ± SE (log), {KL_LABEL}")
    left.set_title("table entries with standard errors")
    handles, labels = left.get_legend_handles_labels()  # outside: the points fill the whole panel
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    _log_kl(right, "x")
    right.set_xlabel("|ΔKL| (log)")
    right.set_ylabel("relative standard error (SE / value)")
    right.set_title("noise relative to signal")
    right.grid(True, which="both", alpha=0.3)
    figure.suptitle(title)
    return figure
