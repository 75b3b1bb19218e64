"""Do hidden states kept in bf16 between layers add KL error below the recorded noise floor? (issue 13 item 2)

The streamed engine keeps, per job in flight and in the prefix cache, the hidden state entering the next decoder
layer in fp32. Keeping it in bf16 would halve that memory. This measures what it costs, on one engine and one set
of windows, side by side:

* `fp32`: the engine as it runs (reference, prefix states and jobs all fp32);
* `bf16`: the same engine whose every stored state is rounded to bf16 (each layer's input and the head's input is
  rounded to bf16 and back, which is exactly what storing it in bf16 and computing in fp32 would do; the fp32
  reference logits are unchanged).

Reported against the noise floors `mixprec measure` records (`bf16_compute`: the model run under bf16 autocast):
the KL the rounding alone adds to the unquantized model, and for every job of a drop-one table (every group x
--bits) the change of its KL, relative to the job's own KL and to the job-to-job differences that the search
ranks (Spearman rank correlation of the two tables, and how many adjacent-rank pairs swap).

Usage:
    .venv/bin/python benchmarks/bf16_states.py --out benchmarks/results/bf16_states.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mixprec.core.fileio import atomic_write_json
from mixprec.core.kl import TokenComparison, summarize
from mixprec.measure.engine.core import EngineConfig, KLEngine, _Plan
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantConfig
from mixprec.quant.variants import ensure_variants


class RoundedStates(KLEngine):
    """The engine with every hidden state it stores rounded to bf16 (the treatment of this experiment)."""

    def _layer(self, layer: int, states: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        return super()._layer(layer, [[_bf16(t) for t in state] for state in states])

    def _head(self, plan, state):  # type: ignore[no-untyped-def]
        return super()._head(plan, [_bf16(t) for t in state])



def unchanged(engine: KLEngine) -> TokenComparison:
    """The unquantized model run from layer 0 through every layer, as a job is run (rounded by `RoundedStates`)."""
    return engine._run([_Plan({}, 0, engine._ref.inputs[0])], store=False)[0]


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: bundled)")
    parser.add_argument("--work", type=Path, default=Path("work/bf16_states"), help="variants folder")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--granularity", default="fine")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[int]:
        order = sorted(range(len(x)), key=x.__getitem__)
        out = [0] * len(x)
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def main() -> None:
    args = parse_args()
    from mixprec.bundled import bundled_model_path

    checkpoint = Checkpoint.open(args.model or bundled_model_path())
    model_map = checkpoint.model_map(args.granularity)
    variants = {v.bits: v for v in ensure_variants(checkpoint, model_map, [QuantConfig(bits=b) for b in args.bits],
                                                   args.work)}
    windows = load_windows(checkpoint.path, "calibration", WindowConfig(args.seq_len, args.windows))
    model = load_model(checkpoint)
    engines = {name: cls(model, model_map, windows, variants, config=EngineConfig())
               for name, cls in (("fp32", KLEngine), ("bf16", RoundedStates))}
    n = engines["fp32"].num_sequences
    floor = summarize(engines["fp32"].evaluate_full({}, autocast_dtype=torch.bfloat16), n)
    assert float(unchanged(engines["fp32"]).kl.abs().max()) == 0.0, "fp32 states: exactly the reference"
    added = summarize(unchanged(engines["bf16"]), n)
    jobs = [{g.name: b} for g in model_map.select() for b in args.bits]
    kl = {name: [float(r.kl.double().mean()) for r in engine.evaluate_many(jobs)] for name, engine in engines.items()}
    deltas = [abs(b - a) for a, b in zip(kl["fp32"], kl["bf16"], strict=True)]
    relative = [d / a for d, a in zip(deltas, kl["fp32"], strict=True) if a > 0]
    order = sorted(range(len(jobs)), key=kl["fp32"].__getitem__)
    swaps = sum(kl["bf16"][i] > kl["bf16"][j] for i, j in zip(order, order[1:], strict=False))
    result = {
        "model": str(checkpoint.path), "windows": args.windows, "seq_len": args.seq_len, "jobs": len(jobs),
        "noise_floor_bf16_compute": floor.kl_mean, "noise_floor_bf16_compute_se": floor.kl_se,
        "added_by_bf16_states": added.kl_mean, "added_by_bf16_states_se": added.kl_se,
        "job_abs_delta_median": statistics.median(deltas), "job_abs_delta_max": max(deltas),
        "job_rel_delta_median": statistics.median(relative), "job_rel_delta_max": max(relative),
        "jobs_delta_above_floor": sum(d > floor.kl_mean for d in deltas),
        "spearman": _spearman(kl["fp32"], kl["bf16"]), "adjacent_rank_swaps": swaps,
        "job_kl_min": min(kl["fp32"]), "job_kl_median": statistics.median(kl["fp32"]),
    }
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    if args.out is not None:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
