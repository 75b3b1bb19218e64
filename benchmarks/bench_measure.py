"""Benchmark the KL engine: naive full forwards vs prefix cache vs batched candidates, as ratios in one run.

Two workloads on the same engine, each method timed in interleaved repeats (the order rotates every
repeat, because timings on a shared VM drift by 20-40%, FIELD.md §9.6) and reported as medians:

* table:  a measurement table (every group x --bits, one group swapped at a time), as `mixprec measure`
          runs it: naive = `evaluate_full` per candidate, cached = `evaluate` per candidate,
          batched = one `evaluate_many` over all candidates.
* search: a chain of composed recipes where each differs from the previous in one random group,
          as a local search evaluates them: naive = `evaluate_full`, cached = `evaluate` (layer-input
          cache plus the assignment-prefix cache).

It also prints decoder-layer forwards per method (one = all windows through one layer for one
assignment) and layer calls, checks that the cached results equal the naive ones bitwise, and on a
GPU prints tokens/s and model FLOP utilisation (2 x active parameters per token, against --peak-tflops).

Usage:
    .venv/bin/python benchmarks/bench_measure.py                        # bundled model, CPU
    .venv/bin/python benchmarks/bench_measure.py path/to/model --device cuda --windows 64 --peak-tflops 67
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mixprec.core.kl import TokenComparison
from mixprec.measure.engine.core import EngineConfig, KLEngine
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantConfig
from mixprec.quant.variants import ensure_variants


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: bundled)")
    parser.add_argument("--work", type=Path, default=Path("work/bench_measure"), help="variants folder")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search-steps", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-windows", type=int, default=8)
    parser.add_argument("--max-batch-windows", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device fp32 peak, for utilisation")
    return parser.parse_args()


def active_params_per_token(model: torch.nn.Module) -> int:
    """Matmul parameters a token touches: everything except embeddings and the routed experts it skips."""
    config = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 1)
    top_k = getattr(config, "num_experts_per_tok", num_experts)
    return int(total - experts + experts * top_k / num_experts)


def timed(engine: KLEngine, work: Callable[[], list[TokenComparison]]) -> tuple[float, float, int, int, list]:
    """Wall and CPU seconds of `work`, and the layer forwards / calls it made.

    CPU seconds of this process are reported next to wall time because on a shared VM the wall clock
    mostly measures the neighbours; with a GPU, wall time is the one that counts.
    """
    forwards, calls = engine.layer_forwards, engine.layer_calls
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu = time.perf_counter(), time.process_time()
    results = work()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started, time.process_time() - cpu, engine.layer_forwards - forwards,
            engine.layer_calls - calls, results)


def search_chain(names: list[str], bits: list[int], steps: int, seed: int = 0) -> list[dict[str, int]]:
    rng = random.Random(seed)
    current = {name: rng.choice(bits) for name in names}
    chain = [dict(current)]
    for _ in range(steps - 1):
        current[rng.choice(names)] = rng.choice(bits)
        chain.append(dict(current))
    return chain


def run_methods(engine: KLEngine, methods: dict[str, Callable[[], list[TokenComparison]]],
                repeats: int) -> dict[str, dict[str, object]]:
    order = list(methods)
    stats: dict[str, dict[str, object]] = {m: {"times": [], "cpu": []} for m in order}
    for rep in range(repeats):
        for name in order[rep % len(order):] + order[: rep % len(order)]:
            engine.clear_prefix_cache()  # every repeat starts cold: no state left from another method
            seconds, cpu, forwards, calls, results = timed(engine, methods[name])
            stats[name]["times"].append(seconds)  # type: ignore[union-attr]
            stats[name]["cpu"].append(cpu)  # type: ignore[union-attr]
            stats[name].update(forwards=forwards, calls=calls, results=results)
    return stats


def report(title: str, stats: dict[str, dict[str, object]], tokens: int, flops_per_token: float,
           peak_tflops: float | None) -> None:
    naive = statistics.median(stats["naive"]["times"])  # type: ignore[arg-type]
    naive_cpu = statistics.median(stats["naive"]["cpu"])  # type: ignore[arg-type]
    reference = stats["naive"]["results"]
    print(f"\n{title}")
    print(f"{'method':8} {'wall s':>8} {'speed-up':>9} {'cpu s':>8} {'cpu speed-up':>12} {'layer fwd':>10} "
          f"{'calls':>6} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6}  max |KL - naive|")
    for name, entry in stats.items():
        seconds = statistics.median(entry["times"])  # type: ignore[arg-type]
        cpu = statistics.median(entry["cpu"])  # type: ignore[arg-type]
        diff = max(float((a.kl - b.kl).abs().max()) for a, b in zip(entry["results"], reference, strict=True))  # type: ignore[call-overload]
        rate = tokens / seconds
        tflops = rate * flops_per_token / 1e12
        mfu = f"{tflops / peak_tflops:6.1%}" if peak_tflops else "   n/a"
        print(f"{name:8} {seconds:8.2f} {naive / seconds:8.2f}x {cpu:8.2f} {naive_cpu / cpu:11.2f}x "
              f"{entry['forwards']:>10} {entry['calls']:>6} {rate:8.0f} {tflops:8.3f} {mfu}  {diff:.1e}")


def main() -> None:
    args = parse_args()
    checkpoint = Checkpoint.open(args.model)
    model_map = checkpoint.model_map("layer")
    variants = ensure_variants(checkpoint, model_map, [QuantConfig(bits=b) for b in args.bits], args.work)
    windows = load_windows(checkpoint.path, "calibration", WindowConfig(args.seq_len, args.windows))
    model = load_model(checkpoint)
    engine = KLEngine(model, model_map, windows, {v.bits: v for v in variants}, args.device,
                      EngineConfig(batch_windows=args.batch_windows, max_batch_windows=args.max_batch_windows))
    names = [g.name for g in model_map.select()]
    candidates = [{name: bits} for name in names for bits in args.bits]
    chain = search_chain(names, args.bits, args.search_steps)
    flops_per_token = 2.0 * active_params_per_token(model)
    print(f"model {checkpoint.path.name}: {engine.num_layers} layers, {len(names)} groups; {engine.num_sequences} "
          f"windows x {args.seq_len} tokens on {engine.device} ({torch.get_num_threads()} threads); "
          f"reference {engine.reference_seconds:.2f} s")
    table = run_methods(engine, {
        "naive": lambda: [engine.evaluate_full(a) for a in candidates],
        "cached": lambda: [engine.evaluate(a) for a in candidates],
        "batched": lambda: engine.evaluate_many(candidates),
    }, args.repeats)
    tokens = windows.tokens.numel()
    report(f"table: {len(candidates)} candidates (groups x bits {args.bits})", table,
           tokens * len(candidates), flops_per_token, args.peak_tflops)
    search = run_methods(engine, {
        "naive": lambda: [engine.evaluate_full(a) for a in chain],
        "cached": lambda: [engine.evaluate(a) for a in chain],
    }, args.repeats)
    report(f"search: {len(chain)} composed recipes, one group changed per step", search, tokens * len(chain),
           flops_per_token, args.peak_tflops)
    exact = all(torch.equal(a.kl, b.kl) for a, b in zip(table["cached"]["results"], table["naive"]["results"],  # type: ignore[arg-type]
                                                       strict=True))
    print(f"\ncached == naive bitwise on every table candidate: {exact}; caches: {engine.cache_stats()}")


if __name__ == "__main__":
    main()
