"""Build notebooks/walkthrough.ipynb from the cells below, so the notebook is reviewed as plain Python.

The .ipynb is generated, never edited by hand: change a cell here and run

    .venv/bin/python notebooks/build_walkthrough.py

tests/test_notebooks.py checks that the committed notebook equals this script's output and executes
it with nbclient against a real work folder, so it cannot rot. Cell ids are fixed (not random) and
outputs are left empty, which keeps the file byte-for-byte reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["CELLS", "build", "main"]

NOTEBOOK = Path(__file__).resolve().parent / "walkthrough.ipynb"

#: (kind, source) in order; kind is "md" or "code".
CELLS: list[tuple[str, str]] = [
    ("md", """# mixprec walkthrough: from sensitivity table to recipe

This notebook reads a mixprec work folder (what `mixprec demo`, or `mixprec quantize` → `measure` →
`search`, leaves behind) with pandas and shows the tables and figures behind a recipe.

Set `MIXPREC_WORK` to the work folder before starting Jupyter; the default is `../work/demo`, the folder
`runs/demo.sh` writes. Nothing here runs the model: every number was measured by the stages."""),
    ("code", """import json
import os
from pathlib import Path

import pandas as pd
from IPython.display import Image, display

from mixprec.report import build_report, collect

pd.set_option("display.precision", 4)
WORK = Path(os.environ.get("MIXPREC_WORK", "../work/demo"))
data = collect(WORK)
print(f"model {data.model_name}: {len(data.groups())} groups, budgets {data.budgets()}")"""),
    ("md", """## Variants

One uniform quantization of the whole model per bit width; `bpw` counts the fp16 scales."""),
    ("code", "data.variants"),
    ("md", """## The sensitivity table

One row per group and bit width: the end-to-end KL(ref ‖ quant) when only that group is quantized
(drop mode), with its standard error over sequences, the 99th percentile and same-top-1 rate."""),
    ("code", """m = data.measurement
print(m.folder.name, "noise floor (bf16 compute):", m.summary.noise_floor_kl("bf16_compute"))
m.table[["group", "kind", "bits", "bpw", "kl_mean", "kl_se", "kl_p99", "same_top1"]].head(12)"""),
    ("code", """# groups as rows, bit widths as columns
m.pivot("dkl").map(lambda v: f"{v:.2e}")"""),
    ("code", """# the three most sensitive groups at each width
m.table.sort_values("dkl", ascending=False).groupby("bits").head(3)[["bits", "group", "dkl", "dkl_se"]]"""),
    ("md", """## Recipes compared on held-out text

Each search re-measures its recipe and the baselines (exllamav3's greedy, the `--hq` rule, uniform)
on the evaluation split, paired on the same tokens: `diff_vs_mixprec ± diff_se` is the paired
difference, far tighter than either KL's own error bar."""),
    ("code", """cmp = data.comparison()
cmp[["budget", "recipe", "solver", "bpw", "predicted", "evaluation_kl", "evaluation_se", "diff_vs_mixprec",
     "diff_se", "ratio_vs_mixprec"]]"""),
    ("code", """# held-out KL: one row per budget, one column per recipe
cmp.pivot_table(index="budget", columns="recipe", values="evaluation_kl")"""),
    ("md", """## Where the bits went

Bits per group in each recipe, then the parameter-weighted mean bits per kind of group."""),
    ("code", """bits = data.bit_table()
bits"""),
    ("code", """params = data.groups().set_index("group")["params"]
recipes = [r.label for r in data.recipes]
weighted = bits[recipes].astype("float").mul(params, axis=0).assign(kind=bits["kind"], params=params)
per_kind = weighted.groupby("kind")[recipes].sum().div(weighted.groupby("kind")["params"].sum(), axis=0)
per_kind.round(2)"""),
    ("md", """## The Optuna studies

Every trial is a composed recipe measured for real; `predicted` is the sum of its groups' single-group
KLs. Their ratio says how additive the damage is (1 = the solver's estimate is exact)."""),
    ("code", """trials = data.trials()
if trials.empty:
    print("no study trials found (studies not in the work folder)")
else:
    trials = trials.assign(ratio=trials["kl"] / trials["predicted"])
    display(trials.groupby("study")["ratio"].describe()[["count", "mean", "min", "max"]])
trials.head()"""),
    ("md", """## Figures

`build_report` writes the same figures `mixprec report` does (here without uploading them to the studies)."""),
    ("code", """page = build_report(WORK, attach=False)
index = json.loads((page.parent / "report.json").read_text())
for figure in index["figures"]:
    print(figure["title"])
    display(Image(filename=str(page.parent / figure["file"])))"""),
]


def build() -> object:
    """The notebook as an nbformat node (fixed cell ids, no outputs)."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}
    for i, (kind, source) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{i:02d}"
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


def main(argv: list[str] | None = None) -> int:
    import nbformat

    from mixprec.core.fileio import atomic_write_text

    target = Path(argv[0]) if argv else NOTEBOOK
    atomic_write_text(target, nbformat.writes(build()))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
