"""Two sets of recipes for the same model, compared paired on the same held-out tokens, budget by budget.

Used to compare what two versions of the search shipped (e.g. the committed recipes/ against a new sweep's):
for each pair it prints held-out KL ± SE of both, the paired difference B − A ± SE and the ratio B / A ±
its paired bootstrap SE (both resample whole sequences for A and B together). The two recipes of a pair share
one engine over both recipes' variants: a widths-only recipe against one with option labels (`--options`) works,
two widths-only recipes must use the same quantizer settings. Recipes at two granularities (e.g. `fine` against
`expert-fine`) run on the finer one's groups, each finer group taking the option of the coarser group that holds
its weights: the same weights, so the same model.

Run: .venv/bin/python benchmarks/paired_recipes.py --a recipes/stdlib-moe-3.0bpw.yaml ... --b new/...yaml ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.checkpoint.compile import open_variants
from mixprec.cli.common import default_work_dir
from mixprec.core.fileio import atomic_write_json
from mixprec.core.kl import bootstrap_se, paired_difference
from mixprec.formats.recipe import Recipe
from mixprec.measure.engine.core import KLEngine
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint, load_model
from mixprec.model.modelmap import ModelMap
from mixprec.search.pipeline import paired_ratio_se


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--a", type=Path, nargs="+", required=True, help="the reference recipes")
    p.add_argument("--b", type=Path, nargs="+", required=True, help="the compared recipes, same order")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", type=Path, required=True)
    return p


def _variants(a: Recipe, b: Recipe, checkpoint: Checkpoint, work: Path) -> dict[object, object]:
    """Both recipes' variants under their keys (widths or option labels); one key may not mean two variants."""
    found, other = open_variants(a, checkpoint, work), open_variants(b, checkpoint, work)
    clash = [k for k in found.keys() & other.keys() if found[k].config != other[k].config]
    if clash:
        raise SystemExit(f"the recipes use {clash} bits at other quantizer settings; compare them one engine each")
    return {**found, **other}


def _on_groups(recipe: Recipe, finer: ModelMap, checkpoint: Checkpoint) -> dict[str, object]:
    """`recipe`'s options on the groups of `finer`, through the weights each group holds."""
    if recipe.granularity == finer.granularity:
        return dict(recipe.groups)
    owner = {ref: g.name for g in checkpoint.model_map(recipe.granularity).groups for ref in g.weights}
    return {g.name: recipe.groups[owner[g.weights[0]]] for g in finer.groups
            if owner.get(g.weights[0]) in recipe.groups}


def _finer(a: Recipe, b: Recipe, checkpoint: Checkpoint) -> ModelMap:
    maps = [checkpoint.model_map(r.granularity) for r in (a, b)]
    return max(maps, key=lambda m: len(m.groups))


def main() -> None:
    args = _parser().parse_args()
    checkpoint = Checkpoint.open(args.model)
    work = default_work_dir(args.model, args.work)
    windows = load_windows(checkpoint.path, "evaluation", WindowConfig(args.seq_len, args.eval_windows))
    model = load_model(checkpoint)
    rows = []
    for path_a, path_b in zip(args.a, args.b, strict=True):
        a, b = Recipe.load(path_a), Recipe.load(path_b)
        groups = _finer(a, b, checkpoint)
        engine = KLEngine(model, groups, windows, _variants(a, b, checkpoint, work), "cpu")
        kl_a = engine.evaluate(_on_groups(a, groups, checkpoint)).kl
        kl_b = engine.evaluate(_on_groups(b, groups, checkpoint)).kl
        n = engine.num_sequences
        diff, diff_se = paired_difference(kl_b, kl_a, n)
        row = {"a": str(path_a), "b": str(path_b), "bpw_a": a.achieved["bpw"], "bpw_b": b.achieved["bpw"],
               "kl_a": float(kl_a.double().mean()), "se_a": bootstrap_se(kl_a.double().view(n, -1).mean(dim=1)),
               "kl_b": float(kl_b.double().mean()), "se_b": bootstrap_se(kl_b.double().view(n, -1).mean(dim=1)),
               "diff": diff, "diff_se": diff_se, "ratio": float(kl_b.double().mean() / kl_a.double().mean()),
               "ratio_se": paired_ratio_se(kl_b, kl_a, n)}
        rows.append(row)
        print(f"{path_b.name}: A {row['kl_a']:.4e} ({row['bpw_a']:.3f}) B {row['kl_b']:.4e} ({row['bpw_b']:.3f}) "
              f"B-A {diff:+.2e}±{diff_se:.0e}  B/A {row['ratio']:.4f}±{row['ratio_se']:.4f}")
    atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
