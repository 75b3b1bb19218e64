"""Would screening have pruned a winner? The screening rule replayed on an unscreened study's stored KL.

Every trial of a study stores its per-sequence calibration KL (`seq_kl`). For each proposal of the search (no
seed label, or a `corrected-` one) this takes the incumbent it would have been screened against (the best
completed trial before it), the paired difference on the first `--windows` sequences (the screening chunks)
and on all of them, and reports which proposals the rule `diff > z * SE` would have pruned and how much worse
each of those really was on every window (paired, in SEs). A pruned proposal that was better on all windows
is a wrong decision; the script counts them. It also lists the pruned trials of screened studies.

Run: .venv/bin/python benchmarks/screen_replay.py --storage sqlite:///studies/X.db --study X [Y ...]
     --windows 8 --json benchmarks/results/screen_replay.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mixprec.core.fileio import atomic_write_json
from mixprec.core.kl import bootstrap_se
from mixprec.core.storage import open_storage


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", nargs="+", required=True, help="one storage URL per study (or one for all)")
    p.add_argument("--study", nargs="+", required=True)
    p.add_argument("--windows", type=int, default=8, help="screening windows (default 8: one chunk)")
    p.add_argument("--z", type=float, default=2.0, help="paired SEs to prune (default 2)")
    p.add_argument("--json", type=Path, required=True)
    return p


def _is_proposal(trial: FrozenTrial) -> bool:
    seed = trial.user_attrs.get("seed")
    return seed is None or str(seed).startswith("corrected-")


def _paired(a: FrozenTrial, b: FrozenTrial, windows: int | None) -> tuple[float, float]:
    diff = (torch.tensor(a.user_attrs["seq_kl"], dtype=torch.float64)
            - torch.tensor(b.user_attrs["seq_kl"], dtype=torch.float64))[:windows]
    return float(diff.mean()), bootstrap_se(diff)


def _replay(trials: list[FrozenTrial], windows: int, z: float) -> list[dict[str, Any]]:
    done = [t for t in trials if t.state == TrialState.COMPLETE and "seq_kl" in t.user_attrs]
    rows = []
    for trial in done:
        before = [t for t in done if t.number < trial.number]
        if not _is_proposal(trial) or not before:
            continue
        incumbent = min(before, key=lambda t: (t.values[0], t.number))
        screen, screen_se = _paired(trial, incumbent, windows)
        full, full_se = _paired(trial, incumbent, None)
        rows.append({"trial": trial.number, "incumbent": incumbent.number, "screen_diff": screen,
                     "screen_se": screen_se, "prune": screen > z * screen_se, "full_diff": full, "full_se": full_se})
    return rows


def _study(name: str, url: str, windows: int, z: float) -> dict[str, Any]:
    trials = optuna.load_study(study_name=name, storage=open_storage(url, create=False)).trials
    replay = _replay(trials, windows, z)
    pruned = [{"trial": t.number, **t.user_attrs["screen"]} for t in trials
              if t.state == TrialState.PRUNED and "screen" in t.user_attrs]
    wrong = [r for r in replay if r["prune"] and r["full_diff"] < 0]
    print(f"{name}: {len(replay)} completed proposals, {sum(r['prune'] for r in replay)} would be pruned "
          f"({len(wrong)} of them better on all windows); full-window z of those: "
          f"{[round(r['full_diff'] / r['full_se'], 1) for r in replay if r['prune']]}; pruned in the study: "
          f"{[(p['trial'], round(p['diff'] / p['diff_se'], 1)) for p in pruned]}")
    return {"study": name, "replay": replay, "pruned": pruned, "wrong_prunes": len(wrong)}


def main() -> None:
    args = _parser().parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    urls = args.storage if len(args.storage) == len(args.study) else args.storage[:1] * len(args.study)
    results = [_study(name, url, args.windows, args.z) for name, url in zip(args.study, urls, strict=True)]
    atomic_write_json(args.json, {"windows": args.windows, "z": args.z, "studies": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
