"""Whole-model held-out KL of RTN vs GPTQ variants at the same bit widths, side by side.

Every quantizable group (attention, dense MLP, shared and routed experts) is set to the variant at b
bits; the model is compared with an untouched fp32 reference on the evaluation split (32 x 256 tokens
by default) with `mixprec.core.kl`. The paired difference (GPTQ − RTN on the same tokens, bootstrap over
sequences) says whether a gap is larger than the noise. GPTQ is calibrated on the bundled corpus's
train split by default, disjoint from the evaluation tokens (checked).

Run: .venv/bin/python benchmarks/gptq_vs_rtn_kl.py [MODEL] [--bits 2 3 4] [--no-act-order] [--damp 0.01]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from mixprec.cli.common import default_work_dir
from mixprec.core.kl import TokenComparison, compare_logits, paired_difference, summarize
from mixprec.model.data import WindowConfig, load_windows, require_disjoint
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantSettings
from mixprec.quant.calibration import Calibration, calibration_windows
from mixprec.quant.gptq import GPTQSettings
from mixprec.quant.hessians import CalibConfig
from mixprec.quant.variants import Variant, apply_group, ensure_variants


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default ./work/<model name>)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=CalibConfig.num_windows)
    p.add_argument("--calib-seq-len", type=int, default=CalibConfig.seq_len)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=GPTQSettings.act_order)
    p.add_argument("--damp", type=float, default=GPTQSettings.damp)
    p.add_argument("--fallback", type=float, default=CalibConfig.fallback_tokens_per_input,
                   help="expert blend threshold, routed tokens per input feature")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    return p


def _logits(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 8) -> torch.Tensor:
    with torch.no_grad():
        parts = [model(input_ids=chunk, use_cache=False).logits[:, :-1] for chunk in tokens.split(batch)]
    return torch.cat(parts).reshape(-1, parts[0].shape[-1])


def _whole_model_kl(model: torch.nn.Module, reference: dict[str, torch.Tensor], variant: Variant,
                    checkpoint: Checkpoint, tokens: torch.Tensor, ref_logits: torch.Tensor) -> TokenComparison:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in reference.items():
            params[name].copy_(value)
        for group in checkpoint.model_map("layer").select():
            apply_group(params, group, variant)
    return compare_logits(ref_logits, _logits(model, tokens), tokens[:, 1:].reshape(-1))


def _row(bits: int, cmps: dict[str, TokenComparison], n_seq: int) -> dict:
    summaries = {m: summarize(c, n_seq) for m, c in cmps.items()}
    diff, diff_se = paired_difference(cmps["gptq"].kl, cmps["rtn"].kl, n_seq)
    return {"bits": bits, "rtn_kl": summaries["rtn"].kl_mean, "rtn_se": summaries["rtn"].kl_se,
            "gptq_kl": summaries["gptq"].kl_mean, "gptq_se": summaries["gptq"].kl_se,
            "ratio": summaries["gptq"].kl_mean / summaries["rtn"].kl_mean, "diff": diff, "diff_se": diff_se,
            "rtn_top1": summaries["rtn"].same_top1, "gptq_top1": summaries["gptq"].same_top1}


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    checkpoint = Checkpoint.open(args.model)
    work = default_work_dir(args.model, args.work)
    model_map = checkpoint.model_map("layer")
    calib_config = CalibConfig(num_windows=args.calib_windows, seq_len=args.calib_seq_len,
                               fallback_tokens_per_input=args.fallback)
    calib_windows = calibration_windows(checkpoint.path, calib_config)
    evaluation = load_windows(checkpoint.path, "evaluation", WindowConfig(args.eval_seq_len, args.eval_windows))
    require_disjoint(calib_windows.spec, evaluation.spec)
    solver = GPTQSettings(damp=args.damp, act_order=args.act_order)
    calibration = Calibration(checkpoint, calib_windows, calib_config, work / "calibration", solver)
    started = time.perf_counter()
    rtn, gptq = (QuantSettings(method=m, group_size=args.group_size) for m in ("rtn", "gptq"))
    variants = {
        "rtn": ensure_variants(checkpoint, model_map, [rtn.config(b) for b in args.bits], work),
        "gptq": ensure_variants(checkpoint, model_map, [gptq.config(b) for b in args.bits], work,
                                calibration=calibration),
    }
    print(f"variants ready in {time.perf_counter() - started:.1f} s; calibration {calib_windows.spec.source} "
          f"({calib_windows.spec.num_tokens} tokens), solver {solver}")
    reference_model = load_model(checkpoint)
    reference = {n: p.detach().clone() for n, p in reference_model.named_parameters()}
    quantized = copy.deepcopy(reference_model)
    tokens = evaluation.tokens
    ref_logits = _logits(reference_model, tokens)
    rows = []
    for i, bits in enumerate(args.bits):
        cmps = {m: _whole_model_kl(quantized, reference, variants[m][i], checkpoint, tokens, ref_logits)
                for m in ("rtn", "gptq")}
        rows.append(_row(bits, cmps, tokens.shape[0]))
    _print(rows, evaluation.spec.source, int(tokens.shape[0] * (tokens.shape[1] - 1)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _print(rows: list[dict], source: str, n_tokens: int) -> None:
    print(f"whole-model KL(ref || q) on {source}, {n_tokens} scored tokens; ± = bootstrap SE over sequences")
    print(f"{'bits':>4} {'RTN KL':>20} {'GPTQ KL':>20} {'GPTQ/RTN':>9} {'GPTQ−RTN (paired)':>24} "
          f"{'top1 RTN':>9} {'top1 GPTQ':>9}")
    for r in rows:
        print(f"{r['bits']:>4} {r['rtn_kl']:>11.4e} ± {r['rtn_se']:.1e} {r['gptq_kl']:>11.4e} ± {r['gptq_se']:.1e} "
              f"{r['ratio']:>9.3f} {r['diff']:>+13.3e} ± {r['diff_se']:.1e} "
              f"{r['rtn_top1']:>9.4f} {r['gptq_top1']:>9.4f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(_parser().parse_args())
