"""llama.cpp's hand-tuned mixes (`llama-quantize` ftypes) vs mixprec's GGUF recipe at the same size, in llama.cpp.

For each ftype (Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M) the BF16 GGUF is quantized by
`llama_model_quantize` itself; its bytes over the searchable tensors (attention, dense MLP, shared and
routed experts) set the budget of a mixprec search over ggml types (`--method gguf`, the same K-quants).
The mixprec recipe is then written by the same `llama_model_quantize`, from the same BF16 file, through
mixprec's `--tensor-type-file` items (`--pure`), with token_embd / output given the ftype's own types, so
both files differ only in how the searchable tensors are mixed. Every file is evaluated by llama.cpp
(llama-cpp-python logits) against the fp32 transformers reference on held-out windows: KL per sequence,
mean ± SE, and the paired difference (same tokens) with its SE. The model must be in a layout llama.cpp
computes (the bundled model is).

With --imatrix both sides get the same importance matrix: the diagonals of mixprec's calibration Hessians
(train split, each routed expert's from its own routed tokens) are passed to `llama_model_quantize` as its
imatrix for the ftypes and for writing mixprec's recipe, and mixprec searches `--method gguf-imatrix` variants
quantized with them. The i-quant ftypes (IQ2_XXS, IQ1_M: sub-2.5-bit mixes, which llama.cpp only writes with
an imatrix) need --imatrix and are matched by a `--method gguf-iq` search over widths 1 (IQ1_M) to 8.

Run: .venv/bin/python benchmarks/gguf_vs_llama_quantize.py [MODEL] --work work/llamacpp --trials 24
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from mixprec.checkpoint.gguf import compile_gguf, llama_quantize_types
from mixprec.core.fileio import atomic_write_json
from mixprec.core.kl import bootstrap_se
from mixprec.formats.llamacpp import gguf_name
from mixprec.formats.recipe import Budget, ModelRef, Recipe
from mixprec.measure.config import MeasureConfig
from mixprec.model.data import WindowConfig, load_windows
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantSettings
from mixprec.search.inputs import StageConfig, check, measure_missing, prepare
from mixprec.search.pipeline import EngineCache, run_stage
from mixprec.search.study import SearchConfig, quiet_optuna

FTYPES = {"Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17}
#: llama.cpp's i-quant mixes (LLAMA_FTYPE_MOSTLY_*), run only when asked for by --ftypes (they need --imatrix).
IQ_FTYPES = {"IQ2_XXS": 19, "IQ1_M": 31}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None,
                   help="model folder in a layout llama.cpp computes (default: the bundled model)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--ftypes", nargs="+", default=list(FTYPES), choices=[*FTYPES, *IQ_FTYPES])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the llama.cpp evaluation")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--imatrix", action="store_true", help="both sides with the calibration importance matrix")
    p.add_argument("--json", type=Path, default=None,
                   help="default benchmarks/results/gguf_vs_llama_quantize[_imatrix].json")
    return p


def _imatrix_param(imatrix: dict[str, np.ndarray]) -> ctypes.Array:
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for slot, (name, values) in zip(entries, imatrix.items(), strict=False):
        slot.name = name.encode()
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    return entries


def _quantize(base: Path, out: Path, ftype: int, overrides: dict[str, str] | None = None,
              imatrix: dict[str, np.ndarray] | None = None) -> None:
    """`llama-quantize [--imatrix] [--pure --tensor-type-file] base out FTYPE`, through the library call it makes."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    if imatrix:
        entries = _imatrix_param(imatrix)  # kept alive until the call returns
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        items = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for slot, (pattern, qtype) in zip(items, overrides.items(), strict=False):
            slot.pattern, slot.type = pattern.encode(), int(GGMLQuantizationType[qtype])
        params.pure = True
        params.tt_overrides = ctypes.cast(items, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {out}")


def _llama_kl(path: Path, windows: torch.Tensor, reference: list[torch.Tensor]) -> torch.Tensor:
    """KL(fp32 reference ‖ llama.cpp) per sequence (mean over its tokens)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          verbose=False, n_threads=2)
    per_seq = []
    try:
        for tokens, ref in zip(windows.tolist(), reference, strict=True):
            llm.reset()
            llm.eval(tokens)
            q = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(tokens)]), dtype=torch.float64), -1)
            per_seq.append(float((ref.exp() * (ref - q)).sum(-1).mean()))
    finally:
        llm.close()
    return torch.tensor(per_seq, dtype=torch.float64)


def _reference(checkpoint: Checkpoint, windows: torch.Tensor) -> list[torch.Tensor]:
    model = load_model(checkpoint)
    with torch.no_grad():
        return [torch.log_softmax(model(w[None]).logits[0].double(), -1) for w in windows]


def _searchable(checkpoint: Checkpoint) -> tuple[set[str], int]:
    """GGUF names of the searchable tensors and their parameter count."""
    groups = checkpoint.model_map("fine").select()
    names = {gguf_name(ref.key).name for g in groups for ref in g.weights}  # type: ignore[union-attr]
    return names, sum(g.num_params for g in groups)


def _sizes(path: Path, searchable: set[str], params: int) -> dict[str, object]:
    tensors = GGUFReader(path).tensors
    qbytes = sum(int(t.n_bytes) for t in tensors if t.name in searchable)
    return {"file_bytes": path.stat().st_size, "searchable_bytes": qbytes, "bpw": 8 * qbytes / params,
            "types": {t.name: t.tensor_type.name for t in tensors}}


def _imatrix(checkpoint: Checkpoint, work: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> Hessian diagonal per input column, experts concatenated in order (llama.cpp's layout)."""
    from mixprec.quant.calibration import Calibration, calibration_windows
    from mixprec.quant.hessians import CalibConfig

    config = CalibConfig()
    calibration = Calibration(checkpoint, calibration_windows(checkpoint.path, config), config, work / "calibration")
    parts: dict[str, dict[int, np.ndarray]] = {}
    for group in checkpoint.model_map("layer").select():
        for ref in group.weights:
            target = gguf_name(ref.key)
            assert target is not None
            diag = torch.diagonal(calibration.hessian(group, ref)).clamp_min(0).to(torch.float32).numpy()
            parts.setdefault(target.name, {})[-1 if target.expert is None else target.expert] = diag
    return {name: np.ascontiguousarray(np.concatenate([d[e] for e in sorted(d)])) for name, d in parts.items()}


def _method(args: argparse.Namespace, ftype: str = "Q2_K") -> str:
    if ftype in IQ_FTYPES:
        return "gguf-iq"
    return "gguf-imatrix" if args.imatrix else "gguf"


def _search(args: argparse.Namespace, ftype: str, budget: float, engines: EngineCache) -> Recipe:
    method = _method(args, ftype)
    measure = MeasureConfig(work=args.work, model=args.model, granularity="fine", quant=QuantSettings(method=method),
                            bits=(1, 2, 3, 4, 5, 6, 8) if method == "gguf-iq" else (2, 3, 4, 5, 6, 8),
                            seq_len=args.seq_len)
    search = SearchConfig(trials=args.trials, studies_dir=args.work / "studies",
                          study_name=f"{method}-{budget:.4f}bpw")
    config = StageConfig(work=args.work, budget=Budget(bpw=budget), model=args.model, measure=measure,
                         search=search, eval_windows=16, eval_seq_len=args.seq_len)
    check(config)
    measure_missing(config)
    return run_stage(config, prepare(config), engines=engines).recipe


def _row(name: str, kl: torch.Tensor, sizes: dict[str, object]) -> dict[str, object]:
    return {"name": name, "kl": float(kl.mean()), "se": bootstrap_se(kl), "per_sequence": kl.tolist(),
            **{k: v for k, v in sizes.items() if k != "types"}}


def _one(args: argparse.Namespace, ftype: str, base: Path, ctx: dict) -> dict[str, object]:
    tag = "-imatrix" if args.imatrix else ""
    peer_path = args.work / f"{ftype}{tag}.gguf"
    _quantize(base, peer_path, {**FTYPES, **IQ_FTYPES}[ftype], imatrix=ctx["imatrix"])
    peer_sizes = _sizes(peer_path, ctx["searchable"], ctx["params"])
    recipe = _search(args, ftype, float(peer_sizes["bpw"]), ctx["engines"])  # type: ignore[arg-type]
    recipe.save(args.work / f"mixprec-{ftype}{tag}.yaml")
    overrides = {f"^{n}$".replace(".", r"\."): t.upper() for n, t in
                 llama_quantize_types(recipe, ctx["checkpoint"]).items()}
    peer_types = peer_sizes["types"]
    for name in ("token_embd.weight", "output.weight"):
        overrides[f"^{name}$".replace(".", r"\.")] = peer_types[name]  # type: ignore[index]
    ours_path = args.work / f"mixprec-{ftype}{tag}.gguf"
    _quantize(base, ours_path, FTYPES["Q5_K_M"], overrides, imatrix=ctx["imatrix"])  # the blocks mixprec measured
    peer = _row(ftype, _llama_kl(peer_path, ctx["windows"], ctx["reference"]), peer_sizes)
    ours = _row(f"mixprec@{ftype}", _llama_kl(ours_path, ctx["windows"], ctx["reference"]),
                _sizes(ours_path, ctx["searchable"], ctx["params"]))
    diff = torch.tensor(peer["per_sequence"]) - torch.tensor(ours["per_sequence"])  # type: ignore[arg-type]
    return {"ftype": ftype, "peer": peer, "mixprec": ours, "ratio": ours["kl"] / peer["kl"],  # type: ignore[operator]
            "diff": float(diff.mean()), "diff_se": bootstrap_se(diff)}


def _print(results: list[dict]) -> None:
    print(f"{'ftype':8} {'file MiB':>8} {'bpw':>6} {'llama.cpp KL':>18}   {'file MiB':>8} {'bpw':>6} "
          f"{'mixprec KL':>18} {'ratio':>6} {'paired diff':>18}")
    for r in results:
        p, m = r["peer"], r["mixprec"]
        print(f"{r['ftype']:8} {p['file_bytes'] / 2**20:8.2f} {p['bpw']:6.3f} {p['kl']:.3e} ± {p['se']:.0e}   "
              f"{m['file_bytes'] / 2**20:8.2f} {m['bpw']:6.3f} {m['kl']:.3e} ± {m['se']:.0e} {r['ratio']:6.2f} "
              f"{r['diff']:+.2e} ± {r['diff_se']:.0e}")


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_optuna()
    started = time.perf_counter()
    checkpoint = Checkpoint.open(args.model)
    model_map = checkpoint.model_map("fine")
    base = args.work / "base-bf16.gguf"
    args.json = args.json or Path(f"benchmarks/results/gguf_vs_llama_quantize{'_imatrix' if args.imatrix else ''}.json")
    imatrix = None
    iq = [f for f in args.ftypes if f in IQ_FTYPES]
    if iq and not args.imatrix:
        raise SystemExit(f"--ftypes {' '.join(iq)}: llama.cpp writes i-quant mixes only with an imatrix; add --imatrix")
    if args.imatrix:
        from mixprec.cli import main as cli

        for method, bits in (("gguf-imatrix", [2, 3, 4, 5, 6, 8]), ("gguf-iq", [1, 2, 3, 4, 5, 6, 8])):
            if any(_method(args, f) == method for f in args.ftypes):
                cli(["quantize", str(checkpoint.path), "--work", str(args.work), "--method", method,
                     "--bits", *map(str, bits)])
        imatrix = _imatrix(checkpoint, args.work)
    empty = Recipe(ModelRef(checkpoint.path.name, checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                   QuantSettings(method="gguf"), {g.name: None for g in model_map.select()})
    compile_gguf(empty, checkpoint, args.work, base)
    windows = load_windows(checkpoint.path, "evaluation", WindowConfig(args.seq_len, args.eval_windows)).tokens
    searchable, params = _searchable(checkpoint)
    reference = _reference(checkpoint, windows)
    ctx = {"checkpoint": checkpoint, "windows": windows, "reference": reference, "searchable": searchable,
           "params": params, "engines": EngineCache(), "imatrix": imatrix}
    floor = _llama_kl(base, windows, reference)
    results = [_one(args, ftype, base, ctx) for ftype in args.ftypes]
    atomic_write_json(args.json, {"model": str(checkpoint.path), "imatrix": args.imatrix,
                                  "eval_windows": args.eval_windows,
                                  "seq_len": args.seq_len, "trials": args.trials,
                                  "bf16_gguf_floor": {"kl": float(floor.mean()), "se": bootstrap_se(floor)},
                                  "seconds": round(time.perf_counter() - started, 1), "rows": results})
    print(f"llama.cpp BF16 GGUF vs fp32 reference (engine floor): {float(floor.mean()):.2e} "
          f"± {bootstrap_se(floor):.0e}")
    _print(results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
