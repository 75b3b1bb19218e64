"""Peak memory of the stages on generated MoE checkpoints: in-memory vs streamed measurement, side by side.

Generates random-weight checkpoints in the Qwen3-MoE layout (default: hidden 1024, 64 experts top-8, expert
width 384, vocab 4096) or the DeepSeek-V3 layout (`--layout deepseek_v3`: MLA attention, a shared expert, the
first layer dense); the layer count is the size knob, so "same layer size, more layers") straight to
sharded bf16 safetensors with per-expert keys, one layer at a time (the generator never holds the model).
Then, per model, each stage runs as its own `mixprec` process and its peak RSS is read from the kernel
(`os.wait4` rusage ru_maxrss: the high-water mark, which sampling can miss) next to psutil-sampled peaks
of anonymous memory (RSS minus file-backed pages, i.e. what cannot be dropped under pressure):

    quantize --bits 2 4              once per model (streams tensor by tensor)
    measure --streaming off / on     interleaved, --repeats times each, same variants
    compile                          a fixed recipe (layers alternating 2 and 4 bits), written tensor by tensor
    search --streaming off / on      after measuring the whole drop table once (streamed): --trials composed
                                     trials, then the held-out check of the recipe and its baselines
    eval --streaming off / on        the compiled candidate against the model, both whole or both streamed

`--stages` picks which run (default quantize measure).

Wall time and layer forwards are reported too: measure and search log the engines' count (one job's pass of one
decoder layer over all windows); eval runs every layer twice (reference and candidate); quantize and compile run
none. Ratios are to the bf16
checkpoint size on disk. The in-memory run is skipped where the fp32 model would exceed --max-in-memory.

Usage:
    .venv/bin/python benchmarks/bench_memory.py --layers 8 --repeats 2
    .venv/bin/python benchmarks/bench_memory.py --layers 4 8 32 --max-jobs 8 --repeats 2 \
        --out benchmarks/results/bench_memory.json
    .venv/bin/python benchmarks/bench_memory.py --layout deepseek_v3 --layers 4 12 32 --max-jobs 8 --repeats 1 \
        --stages quantize measure search compile eval --root /tmp/bench \
        --out benchmarks/results/bench_memory_deepseek.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixprec.core.fileio import atomic_write_json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8], help="decoder layers of each generated model")
    parser.add_argument("--layout", choices=["qwen3_moe", "deepseek_v3"], default="qwen3_moe",
                        help="module layout of the generated checkpoints")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--root", type=Path, default=Path("work/bench_memory"), help="models and work folders")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measure mode (interleaved)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-jobs", type=int, default=None,
                        help="measure only the first N jobs (two batches at layers 0-1 each run every layer: wall "
                             "time then grows with the layer count); default the whole table")
    parser.add_argument("--stages", nargs="+", default=["quantize", "measure"],
                        choices=["quantize", "measure", "search", "compile", "eval"])
    parser.add_argument("--trials", type=int, default=3, help="search: completed composed trials of the study")
    parser.add_argument("--budget", type=float, default=3.0, help="search: bits per weight")
    parser.add_argument("--max-in-memory", type=float, default=8.0, help="skip in-memory runs above this fp32 GB")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    return parser.parse_args()


def model_config(args: argparse.Namespace, layers: int) -> dict[str, object]:
    if args.layout == "deepseek_v3":
        return deepseek_config(args, layers)
    head_dim = 128
    return dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=args.vocab,
                hidden_size=args.hidden, num_hidden_layers=layers, num_attention_heads=args.hidden // head_dim * 2,
                num_key_value_heads=4, head_dim=head_dim, intermediate_size=4 * args.hidden,
                moe_intermediate_size=args.expert_width, num_experts=args.experts,
                num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=1, eos_token_id=2,
                dtype="bfloat16")


def deepseek_config(args: argparse.Namespace, layers: int) -> dict[str, object]:
    """DeepSeek-V3 layout: MLA attention, one shared expert, first layer dense, same routed experts."""
    return dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=args.vocab,
                hidden_size=args.hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                q_lora_rank=args.hidden // 2, kv_lora_rank=args.hidden // 4, qk_rope_head_dim=32,
                qk_nope_head_dim=64, v_head_dim=64, intermediate_size=4 * args.hidden,
                moe_intermediate_size=args.expert_width, n_routed_experts=args.experts, n_shared_experts=1,
                num_experts_per_tok=args.top_k, first_k_dense_replace=1, n_group=1, topk_group=1,
                norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4}, bos_token_id=1, eos_token_id=2,
                dtype="bfloat16")


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def _disk_tensors(name: str, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Checkpoint keys of one in-memory parameter: fused experts split per expert (gate / up / down)."""
    base, _, leaf = name.rpartition(".")
    if leaf == "gate_up_proj":
        experts, rows, cols = shape
        out = {}
        for e in range(experts):
            out[f"{base}.{e}.gate_proj.weight"] = _random((rows // 2, cols), generator)
            out[f"{base}.{e}.up_proj.weight"] = _random((rows // 2, cols), generator)
        return out
    if leaf == "down_proj" and len(shape) == 3:
        return {f"{base}.{e}.down_proj.weight": _random(shape[1:], generator) for e in range(shape[0])}
    return {name: _random(shape, generator)}


def generate(args: argparse.Namespace, layers: int, folder: Path) -> Path:
    """Write config.json, one safetensors shard per layer (+ one for embedding/norm/head), the index, tokens."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model_config(args, layers)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp))
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    # persistent buffers a real checkpoint stores too (DeepSeek's expert-score bias), zero as at initialisation
    buffers = {n: tuple(t.shape) for n, t in skeleton.state_dict().items() if n not in shapes}
    generator = torch.Generator().manual_seed(layers)
    weight_map: dict[str, str] = {}
    total = 0
    for shard, prefix in enumerate([f"model.layers.{i}." for i in range(layers)] + [""]):
        names = [n for n in shapes if n.startswith(prefix) and (prefix or not n.startswith("model.layers."))]
        tensors = {k: v for n in names for k, v in _disk_tensors(n, shapes[n], generator).items()}
        tensors.update({n: torch.zeros(shape) for n, shape in buffers.items()
                        if n.startswith(prefix) and (prefix or not n.startswith("model.layers."))})
        file = f"model-{shard + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for split in ("calibration", "evaluation"):
        tokens = torch.randint(3, args.vocab, (20000,), generator=generator, dtype=torch.int32)
        save_file({"tokens": tokens}, tmp / f"{split}.safetensors")
    tmp.rename(folder)
    return folder


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))


def _vm_hwm(status: Path) -> int:
    """The process's resident high-water mark (VmHWM), in bytes.

    # Note: ru_maxrss of a child counts what the forked copy of this process held before exec, so after this
    # script generated a model in memory, small stages report this script's size; VmHWM starts again at exec.
    """
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_stage(command: list[str]) -> dict[str, float]:
    """Run one mixprec process; its kernel peak RSS (ru_maxrss) and sampled peak anonymous RSS, in GB."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mixprec", *command], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon, hwm = [0], [0]
    done = threading.Event()

    def sample() -> None:
        process = psutil.Process(child.pid)
        status = Path(f"/proc/{child.pid}/status")
        while not done.is_set():
            try:
                info = process.memory_full_info()
                peak_anon[0] = max(peak_anon[0], info.rss - info.shared)
                hwm[0] = max(hwm[0], _vm_hwm(status))
            except (psutil.Error, OSError):
                break
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.stderr.read() if child.stderr else b""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    forwards = re.findall(rb"(\d+) layer forwards", stderr)  # logged by measure and search at INFO
    return {"peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "peak_hwm_gb": hwm[0] / 1e9,
            "peak_anon_gb": peak_anon[0] / 1e9, "wall_s": time.perf_counter() - started,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            **({"layer_forwards": int(forwards[-1])} if forwards else {})}


def measure_command(model: Path, work: Path, args: argparse.Namespace, streaming: str) -> list[str]:
    return ["measure", str(model), "--work", str(work), "--bits", *map(str, args.bits), "--windows",
            str(args.windows), "--seq-len", str(args.seq_len), "--granularity", "layer", "--device", "cpu",
            "--streaming", streaming, "--no-quantize", "--options",
            *(["--max-jobs", str(args.max_jobs)] if args.max_jobs else [])]


def bench_model(args: argparse.Namespace, layers: int) -> dict[str, object]:
    name = "qwen3moe" if args.layout == "qwen3_moe" else args.layout.replace("_", "")
    model = generate(args, layers, args.root / f"{name}-{layers}l")
    size = disk_bytes(model)
    shared = args.root / f"work-{name}-{layers}l"
    result: dict[str, object] = {"layout": args.layout, "layers": layers, "checkpoint_gb": size / 1e9}
    if "quantize" in args.stages or not (shared / "variants").exists():
        shutil.rmtree(shared / "variants", ignore_errors=True)
        result["quantize"] = run_stage(["quantize", str(model), "--work", str(shared), "--bits", *map(str, args.bits)])
        print(f"{layers} layers, quantize: {result['quantize']}", flush=True)
    modes = ["off", "on"] if 2 * size / 1e9 <= args.max_in_memory else ["on"]
    if "measure" in args.stages:
        result["measure"] = bench_measure(args, model, name, layers, shared, modes, size)
    if "search" in args.stages:
        result.update(bench_search(args, model, shared, modes, size))
    if "compile" in args.stages or "eval" in args.stages:
        result.update(bench_compile_eval(args, model, shared, modes, size))
    return result


def bench_compile_eval(args: argparse.Namespace, model: Path, shared: Path, modes: list[str],
                       size: int) -> dict[str, object]:
    """Compile a fixed mixed recipe, then evaluate it against the model whole and streamed."""
    from mixprec.core.fileio import atomic_write_text
    from mixprec.formats.recipe import ModelRef, Recipe
    from mixprec.model.loading import Checkpoint
    from mixprec.quant import QuantSettings

    checkpoint = Checkpoint.open(model)
    model_map = checkpoint.model_map("layer")
    low, high = min(args.bits), max(args.bits)
    groups: dict[str, int | None] = {g.name: (low if (g.layer or 0) % 2 else high) for g in model_map.select()}
    recipe = Recipe(ModelRef(model.name, checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    QuantSettings(), groups)
    atomic_write_text(shared / "recipe.yaml", recipe.to_yaml())
    out = shared / "compiled"
    shutil.rmtree(out, ignore_errors=True)
    result: dict[str, object] = {"compile": run_stage(["compile", str(shared / "recipe.yaml"), "--model", str(model),
                                                       "--work", str(shared), "--out", str(out)])}
    print(f"{model.name}: compile {result['compile']}", flush=True)
    if "eval" in args.stages:
        evals = {}
        for mode in modes:
            evals[mode] = run_stage(["eval", str(out), "--reference", str(model), "--windows", str(args.windows),
                                     "--seq-len", str(args.seq_len), "--streaming", mode])
            evals[mode]["ratio_to_bf16"] = evals[mode]["peak_rss_gb"] / (size / 1e9)
            evals[mode]["layer_forwards"] = 2 * checkpoint.model_map("layer").num_layers  # reference + candidate
            print(f"{model.name}: eval --streaming {mode} {evals[mode]}", flush=True)
        result["eval"] = evals
    return result


def bench_search(args: argparse.Namespace, model: Path, shared: Path, modes: list[str],
                 size: int) -> dict[str, object]:
    """The whole drop table (streamed; search reads it), then `search --trials N` per streaming mode: the study's
    composed trials and the held-out check of the recipe and its baselines (one group size: no extra variants)."""
    table = ["--windows", str(args.windows), "--seq-len", str(args.seq_len), "--bits", *map(str, args.bits),
             "--granularity", "layer", "--device", "cpu", "--options"]  # one group size: the variants quantized
    result: dict[str, object] = {}
    if not list(shared.glob("measure/drop-layer/table.csv")):
        result["measure_table"] = run_stage(["measure", str(model), "--work", str(shared), *table,
                                             "--streaming", "on", "--no-quantize"])
        print(f"{model.name}: whole table {result['measure_table']}", flush=True)
    searches = {}
    for mode in modes:
        shutil.rmtree(shared / f"studies-{mode}", ignore_errors=True)
        searches[mode] = run_stage(["search", str(model), "--work", str(shared), *table, "--budget", str(args.budget),
                                    "--trials", str(args.trials), "--eval-windows", str(args.windows), "--no-measure",
                                    "--uniform-group-sizes", "64", "--studies-dir", str(shared / f"studies-{mode}"),
                                    "--out", str(shared / f"search-{mode}.yaml"), "--force", "--streaming", mode])
        searches[mode]["ratio_to_bf16"] = searches[mode]["peak_rss_gb"] / (size / 1e9)
        print(f"{model.name}: search --streaming {mode} {searches[mode]}", flush=True)
    result["search"] = searches
    return result


def bench_measure(args: argparse.Namespace, model: Path, name: str, layers: int, shared: Path, modes: list[str],
                  size: int) -> dict[str, object]:
    """measure --streaming off / on, interleaved, --repeats times each, on the same variants."""
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            work = args.root / f"work-{name}-{layers}l-{mode}-{repeat}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "variants").symlink_to((shared / "variants").resolve())
            stats = run_stage(measure_command(model, work, args, mode))
            summaries = list(work.glob("measure/*/summary.json"))  # absent when --max-jobs left jobs over
            if summaries:
                stats["streamed"] = json.loads(summaries[0].read_text())["engine"].get("streamed")
            runs[mode].append(stats)
            print(f"{layers} layers, streaming {mode}: {stats}", flush=True)
    return {mode: _summarize(values, size) for mode, values in runs.items()}


def _summarize(runs: list[dict[str, float]], size: int) -> dict[str, object]:
    def spread(key: str) -> tuple[float, float]:
        values = [r[key] for r in runs]
        return statistics.mean(values), (max(values) - min(values)) / 2

    peak, peak_pm = spread("peak_rss_gb")
    return {"runs": runs, "peak_rss_gb": peak, "peak_rss_pm": peak_pm, "ratio_to_bf16": peak / (size / 1e9),
            "peak_anon_gb": spread("peak_anon_gb")[0], "wall_s": spread("wall_s")[0]}


def main() -> None:
    args = parse_args()
    results = [bench_model(args, layers) for layers in args.layers]
    for r in results:
        for mode, m in r.get("measure", {}).items():  # type: ignore[union-attr]
            print(f"{r['layers']:>3} layers ({r['checkpoint_gb']:.2f} GB bf16)  measure --streaming {mode:<3}: "
                  f"peak RSS {m['peak_rss_gb']:.2f} ± {m['peak_rss_pm']:.2f} GB = {m['ratio_to_bf16']:.2f}x "
                  f"checkpoint, anon {m['peak_anon_gb']:.2f} GB, {m['wall_s']:.0f} s")
    if args.out is not None:
        atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
