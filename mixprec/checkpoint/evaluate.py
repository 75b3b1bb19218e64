"""Evaluate any checkpoint against a reference: the llama.cpp KLD statistic set on held-out windows.

The candidate is a `mixprec compile` output (loaded with `mixprec.load`), a plain Hugging Face
folder, or a GGUF file (run by llama.cpp itself, `mixprec.checkpoint.ggufrun`); the reference is
always loaded in fp32 (FIELD.md §8.4). Both models run on the same evaluation windows, a few windows
at a time, and only the per-token comparison (KL, top-1 agreement, label log-probs) is kept, so
memory stays at batch × positions × vocabulary whatever the number of windows. Every scored position
has a next token: position t of a window predicts token t+1.

A compiled folder (or a GGUF mixprec wrote) records the fingerprint of the model it was made from;
evaluating it against a different reference is refused unless asked for explicitly, because the
numbers would look valid and mean nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixprec.checkpoint.ggufrun import LlamaCppModel, gguf_recipe, is_gguf
from mixprec.checkpoint.load import CompiledCheckpoint, is_mixprec_checkpoint, load
from mixprec.checkpoint.streamed import StreamedCompiled, compiled_as_checkpoint
from mixprec.core.errors import FingerprintMismatchError, MixprecError, ModelLoadError
from mixprec.core.fileio import atomic_write_json, read_json
from mixprec.core.kl import CONFIDENCE_BINS, KLSummary, TokenComparison, compare_logits, summarize
from mixprec.core.progress import progress
from mixprec.model.data import DataSpec, TokenWindows, WindowConfig, load_windows
from mixprec.model.loading import Checkpoint, load_model
from mixprec.model.streaming import STREAMING_MODES, StreamedModel, open_model, should_stream

__all__ = ["EvalConfig", "EvalResult", "load_candidate", "compare_models", "evaluate", "format_table",
           "save_result"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Which windows to score and how many windows go through the models at once."""

    seq_len: int = 256
    num_windows: int = 32
    batch_size: int = 4
    split: str = "evaluation"
    n_boot: int = 1000
    seed: int = 0
    streaming: str = "auto"

    def __post_init__(self) -> None:
        WindowConfig(self.seq_len, self.num_windows)  # validates both
        if self.streaming not in STREAMING_MODES:
            raise MixprecError(f"streaming={self.streaming!r} is unknown; use one of {STREAMING_MODES}")
        if self.batch_size < 1:
            raise MixprecError(f"batch_size={self.batch_size} must be at least 1")
        if self.n_boot < 2:
            raise MixprecError(f"n_boot={self.n_boot} must be at least 2 for a standard error")

    @property
    def windows(self) -> WindowConfig:
        return WindowConfig(self.seq_len, self.num_windows)


@dataclass(frozen=True)
class EvalResult:
    """The statistic set of one candidate against one reference on identified data."""

    candidate: str
    candidate_format: str
    reference: str
    data: DataSpec
    summary: KLSummary
    config: EvalConfig
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "mixprec.eval", "candidate": self.candidate, "candidate_format": self.candidate_format,
                "reference": self.reference, "data": self.data.to_dict(), "config": asdict(self.config),
                "summary": self.summary.to_dict(), "ppl_ratio": math.exp(self.summary.ln_ppl_ratio),
                "confidence_bins": list(CONFIDENCE_BINS[:-1]) + [1.0], "timings_s": self.timings}


def _refuse_compressed_tensors(path: Path) -> None:
    """transformers cannot run a mixed-width compressed-tensors MoE (it crashes mid-forward); say so up front."""
    qconfig = read_json(path / "config.json").get("quantization_config") if (path / "config.json").is_file() else None
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors":
        raise ModelLoadError(f"{path} is a compressed-tensors checkpoint (for vLLM), which mixprec eval does not "
                             "read; evaluate the same recipe compiled with --format mixprec: compressed-tensors "
                             "decompresses the compressed-tensors folder to exactly its weights (README)")


def load_candidate(path: str | Path, dtype: torch.dtype = torch.float32,
                   streaming: str = "off") -> tuple[torch.nn.Module, str]:
    """The model in a folder and its format: `mixprec` (compiled: dequantized on load, or layer by layer while
    each layer runs when streamed, `mixprec.checkpoint.streamed`), `hf` (plain; fp32 may be streamed), or
    `gguf` (a GGUF file, run by llama.cpp)."""
    if is_gguf(path):
        return LlamaCppModel(path), "gguf"
    if is_mixprec_checkpoint(path):
        if dtype == torch.float32 and streaming != "off":
            compiled = CompiledCheckpoint.open(path)
            if should_stream(compiled_as_checkpoint(compiled), streaming, torch.device("cpu")):
                return StreamedCompiled(compiled).model, "mixprec"
        return load(path, dtype=dtype), "mixprec"
    _refuse_compressed_tensors(Path(path))
    if dtype == torch.float32 and streaming != "off":
        return _runnable(open_model(Checkpoint.open(path), streaming, torch.device("cpu"))), "hf"
    return load_model(path, dtype=dtype), "hf"


def _runnable(model: torch.nn.Module | StreamedModel) -> torch.nn.Module:
    """A module to call: a streamed model's skeleton streams its layers through its forward hooks."""
    return model.model if isinstance(model, StreamedModel) else model


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits[:, :-1].float()


def compare_models(reference: torch.nn.Module, candidate: torch.nn.Module, windows: torch.Tensor,
                   batch_size: int = 4) -> TokenComparison:
    """Per-token comparison over all windows [N, T], holding only one batch of logits of each model."""
    parts = []
    with torch.inference_mode():
        for start in progress(range(0, windows.shape[0], batch_size), desc="eval", unit="batch",
                              total=-(-windows.shape[0] // batch_size)):
            tokens = windows[start : start + batch_size]
            ref, q = _logits(reference, tokens), _logits(candidate, tokens)
            if ref.shape != q.shape:
                raise MixprecError(f"the models' logits differ in shape ({tuple(ref.shape)} vs {tuple(q.shape)}); "
                                   "the candidate has another vocabulary than the reference")
            vocab = ref.shape[-1]
            parts.append(compare_logits(ref.reshape(-1, vocab), q.reshape(-1, vocab), tokens[:, 1:].reshape(-1)))
    return TokenComparison.cat(parts)


def _check_reference(candidate: Path, reference: Checkpoint) -> None:
    if is_gguf(candidate):
        recipe = gguf_recipe(candidate)
        recorded = None if recipe is None else recipe.model.fingerprint
    else:
        recorded = CompiledCheckpoint.open(candidate, verify_hashes=False).qconfig.get("model_fingerprint")
    if recorded is not None and recorded != reference.fingerprint:
        raise FingerprintMismatchError(
            f"{candidate} was compiled from a model with fingerprint {str(recorded)[:12]}… but the reference "
            f"{reference.path} has {reference.fingerprint[:12]}…; pass the model it was compiled from as "
            "--reference (or --any-reference to compare anyway)")


def evaluate(candidate: str | Path, reference: str | Path | None = None, config: EvalConfig | None = None,
             text_files: list[Path] | None = None, allow_other_reference: bool = False) -> EvalResult:
    """Score `candidate` against `reference` (default: the bundled model) on its evaluation windows."""
    config = config or EvalConfig()
    candidate = Path(candidate)
    _refuse_compressed_tensors(candidate)
    reference_checkpoint = Checkpoint.open(reference)
    if (is_mixprec_checkpoint(candidate) or is_gguf(candidate)) and not allow_other_reference:
        _check_reference(candidate, reference_checkpoint)
    windows: TokenWindows = load_windows(reference_checkpoint.path, config.split, config.windows, text_files)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    ref_model = _runnable(open_model(reference_checkpoint, config.streaming, torch.device("cpu")))
    timings["load_reference"] = time.perf_counter() - started
    started = time.perf_counter()
    cand_model, fmt = load_candidate(candidate, streaming=config.streaming)
    timings["load_candidate"] = time.perf_counter() - started
    started = time.perf_counter()
    cmp = compare_models(ref_model, cand_model, windows.tokens, config.batch_size)
    if isinstance(cand_model, LlamaCppModel):
        cand_model.close()
    timings["forward"] = time.perf_counter() - started
    summary = summarize(cmp, windows.tokens.shape[0], config.n_boot, config.seed)
    timings = {k: round(v, 3) for k, v in timings.items()}
    return EvalResult(str(candidate), fmt, str(reference_checkpoint.path), windows.spec, summary, config, timings)


def _bucket_lines(s: KLSummary) -> list[str]:
    lines = []
    for i, (mean, count) in enumerate(zip(s.bucket_kl_mean, s.bucket_counts, strict=True)):
        hi = min(CONFIDENCE_BINS[i + 1], 1.0)
        close = "]" if hi == 1.0 else ")"
        lines.append(f"p_ref top-1 in [{CONFIDENCE_BINS[i]:.2f}, {hi:.2f}{close}: {count:7d} tokens, "
                     f"mean KLD {mean:.6f}")
    return lines


def format_table(result: EvalResult) -> str:
    """The llama.cpp-style report (plus exllamav3 confidence buckets) as plain text."""
    s = result.summary
    return "\n".join([
        f"candidate : {result.candidate} ({result.candidate_format})",
        f"reference : {result.reference} (fp32)",
        f"data      : {result.data.source} {result.data.split}, {s.n_sequences} x {result.data.seq_len} tokens, "
        f"{s.n_tokens} scored, sha256 {result.data.sha256[:12]}",
        "====== Perplexity statistics ======",
        f"PPL(ref)              : {s.ppl_ref:10.4f}",
        f"PPL(q)                : {s.ppl_q:10.4f}",
        f"ln(PPL(q)/PPL(ref))   : {s.ln_ppl_ratio:10.6f}",
        f"PPL(q)/PPL(ref)       : {math.exp(s.ln_ppl_ratio):10.6f}",
        "====== KL divergence statistics (KL(ref || q), nats) ======",
        f"Mean    KLD: {s.kl_mean:.6f} ± {s.kl_se:.6f}",
        f"Maximum KLD: {s.kl_max:.6f}",
        f"99.9%   KLD: {s.kl_p999:.6f}",
        f"99.0%   KLD: {s.kl_p99:.6f}",
        f"90.0%   KLD: {s.kl_p90:.6f}",
        f"Median  KLD: {s.kl_median:.6f}",
        "====== Token probability statistics ======",
        f"RMS Δp    : {100 * s.rms_dp:.3f} ± {100 * s.rms_dp_se:.3f} %",
        f"Same top p: {100 * s.same_top1:.3f} ± {100 * s.same_top1_se:.3f} %",
        "====== KLD by reference confidence ======",
        *_bucket_lines(s),
        "(± are bootstrap standard errors over windows)",
    ])


def save_result(result: EvalResult, path: str | Path) -> None:
    """Write the result as JSON atomically."""
    atomic_write_json(path, result.to_dict())
