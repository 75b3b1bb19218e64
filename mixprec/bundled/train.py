"""Train the bundled stdlib MoE model and write it, with its tokenizer and data splits, to a folder.

Usage:
    python -m mixprec.bundled.train --out mixprec/bundled/stdlib-moe [--seed 0]

The defaults rebuild the shipped model (TRAINING.json records its config): 6 CPU-minutes per thread
within a 40-minute wall-clock budget, in the bundled layout: every layer MoE with a shared expert and no top-k
renormalisation, which llama.cpp's `qwen2moe` graph runs (`--dense-layers 0 --norm-topk` gives the
older layout with a dense first layer).

The run: discover the stdlib corpus and split it by file; train a byte-level BPE on the train split;
train a small Qwen2-MoE in fp32 master weights (bf16 autocast for speed) against a wall-clock
budget; save a bf16 copy; then measure the held-out loss of exactly the saved weights over the whole
evaluation split. Everything is written to a temporary sibling folder that replaces `--out` only
when the run succeeded, so a crash never leaves a half-written model behind.

On a machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE: with the default spin-waiting,
OpenMP threads that lose their core stall each other, and a training step took 4-14 s instead of
about 1.5 s under a load average of 6 on two cores. The budget is wall-clock, so a busy machine
means fewer steps; TRAINING.json records the load average to explain a slow run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mixprec.bundled.artifacts import SCHEMA_VERSION, save_bf16, split_record, write_token_file
from mixprec.bundled.bpe import TokenizerConfig, encode_split, train_tokenizer
from mixprec.bundled.corpus import Corpus, CorpusConfig, load_corpus
from mixprec.bundled.loop import LoopConfig, LoopResult, heldout_loss, probe_loss, run_training, spread_windows
from mixprec.bundled.model import (
    EXPERTS_IMPLEMENTATION,
    ModelConfig,
    build_model,
    count_parameters,
    to_hf_config,
)
from mixprec.core.fileio import atomic_dir, atomic_write_json

__all__ = ["TrainConfig", "TrainSummary", "build_parser", "config_from_args", "main", "cli"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; stored as `config` in TRAINING.json."""

    out: Path
    seed: int = 0
    threads: int = 2
    probe_windows: int = 32
    loop: LoopConfig = field(default_factory=LoopConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def __post_init__(self) -> None:
        if self.threads < 1 or self.probe_windows < 1:
            raise ValueError(f"threads and probe_windows must be >= 1, got {self.threads}, {self.probe_windows}")
        if self.tokenizer.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {self.tokenizer.vocab_size} != model vocab_size {self.model.vocab_size}"
            )
        if self.loop.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"seq_len {self.loop.seq_len} exceeds max_position_embeddings {self.model.max_position_embeddings}"
            )


@dataclass(frozen=True)
class TrainSummary:
    """The headline numbers of a finished run (the full record is TRAINING.json)."""

    out: Path
    parameters: int
    model_file_bytes: int
    steps: int
    tokens: int
    train_seconds: float
    heldout_loss: float
    probe_loss: float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixprec.bundled.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically on success)")
    p.add_argument("--minutes", type=float, default=40.0, help="training wall-clock budget in minutes")
    p.add_argument("--seed", type=int, default=0, help="seed for weight init and batch order")
    p.add_argument("--cpu-minutes", type=float, default=6.0,
                   help="also stop after this much CPU time per thread (= idle-machine minutes), so a busy machine "
                        "trains as far as an idle one; 0 for none")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps even if time is left")
    p.add_argument("--lr", type=float, default=LoopConfig.lr, help="peak AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=LoopConfig.batch_size, help="windows per step")
    p.add_argument("--seq-len", type=int, default=LoopConfig.seq_len, help="tokens of context per window")
    p.add_argument("--warmup-steps", type=int, default=LoopConfig.warmup_steps, help="linear warmup steps")
    p.add_argument("--eval-every", type=int, default=LoopConfig.eval_every, help="steps between held-out probes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-bf16", action="store_true", help="train without bf16 autocast (slower, fp32 matmuls)")
    p.add_argument("--vocab-size", type=int, default=ModelConfig.vocab_size, help="BPE and model vocabulary")
    p.add_argument("--hidden-size", type=int, default=ModelConfig.hidden_size, help="model width")
    p.add_argument("--num-layers", type=int, default=ModelConfig.num_layers, help="decoder layers")
    p.add_argument("--num-experts", type=int, default=ModelConfig.num_experts, help="routed experts per MoE layer")
    p.add_argument("--intermediate-size", type=int, default=ModelConfig.intermediate_size, help="dense MLP width")
    p.add_argument("--moe-intermediate-size", type=int, default=ModelConfig.moe_intermediate_size,
                   help="routed expert width")
    p.add_argument("--shared-intermediate-size", type=int, default=ModelConfig.shared_expert_intermediate_size,
                   help="shared expert width")
    p.add_argument("--dense-layers", type=int, nargs="*", default=list(ModelConfig.dense_layers), metavar="I",
                   help="layers with a dense MLP instead of experts (default none; llama.cpp's qwen2moe needs none)")
    p.add_argument("--norm-topk", action="store_true",
                   help="renormalise top-k routing weights (llama.cpp's qwen2moe never does; default off)")
    p.add_argument("--router-aux-loss-coef", type=float, default=ModelConfig.router_aux_loss_coef,
                   help="weight of the router's load-balancing loss (higher: fewer idle experts)")
    p.add_argument("--corpus-root", type=Path, default=None, help="folder of .py files (default: the stdlib)")
    p.add_argument("--heldout-fraction", type=float, default=CorpusConfig.evaluation_fraction,
                   help="fraction of files in each of calibration and evaluation")
    p.add_argument("--probe-windows", type=int, default=32, help="held-out windows probed during training")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed flags into a validated TrainConfig."""
    cpu_budget = args.cpu_minutes * 60.0 if args.cpu_minutes else None
    loop = LoopConfig(
        budget_seconds=args.minutes * 60.0, cpu_budget_seconds=cpu_budget, max_steps=args.max_steps,
        lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup_steps,
        eval_every=args.eval_every, bf16_autocast=not args.no_bf16, seed=args.seed,
    )
    model = ModelConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_experts=args.num_experts, intermediate_size=args.intermediate_size,
        moe_intermediate_size=args.moe_intermediate_size,
        shared_expert_intermediate_size=args.shared_intermediate_size,
        dense_layers=tuple(args.dense_layers), norm_topk_prob=args.norm_topk,
        router_aux_loss_coef=args.router_aux_loss_coef,
        max_position_embeddings=max(ModelConfig.max_position_embeddings, args.seq_len),
    )
    corpus = CorpusConfig(root=args.corpus_root, calibration_fraction=args.heldout_fraction,
                          evaluation_fraction=args.heldout_fraction)
    return TrainConfig(out=args.out, seed=args.seed, threads=args.threads, probe_windows=args.probe_windows,
                       loop=loop, model=model,
                       tokenizer=TokenizerConfig(vocab_size=args.vocab_size), corpus=corpus)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _tokenize(corpus: Corpus, config: TrainConfig) -> tuple[PreTrainedTokenizerFast, dict[str, torch.Tensor]]:
    tokenizer = train_tokenizer(corpus.train.texts, config.tokenizer)
    if len(tokenizer) > config.model.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.model.vocab_size}")
    tokens = {split.name: encode_split(tokenizer, split.texts) for split in corpus.splits()}
    for name, ids in tokens.items():
        log.info("%s: %d files, %d tokens", name, len(getattr(corpus, name).files), ids.numel())
    return tokenizer, tokens


def _training_record(
    config: TrainConfig, result: LoopResult, final: dict[str, Any], wall: float, params: int, file_bytes: int
) -> dict[str, Any]:
    """The TRAINING.json document."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": _jsonable(asdict(config)),
        "seed": config.seed,
        "parameters": params,
        "model_file_bytes": file_bytes,
        "experts_implementation": EXPERTS_IMPLEMENTATION,
        "steps": result.steps,
        "tokens_seen": result.tokens,
        "train_seconds": round(result.train_seconds, 2),
        "cpu_seconds_per_thread": round(result.cpu_seconds_per_thread, 2),
        "wall_seconds": round(wall, 2),
        "tokens_per_second": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "curve": [asdict(point) for point in result.curve],
        "final": final,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")},
    }


def _final_eval(folder: Path, eval_tokens: torch.Tensor, probe: torch.Tensor, seq_len: int) -> dict[str, Any]:
    """Held-out loss of the saved bf16 weights, loaded in fp32 as later stages load them."""
    shipped = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, experts_implementation=EXPERTS_IMPLEMENTATION
    )
    loss = heldout_loss(shipped, eval_tokens, seq_len)
    subset = probe_loss(shipped, probe)
    log.info("final held-out loss %.4f (ppl %.1f) over %d tokens; probe %.4f", loss, math.exp(loss),
             eval_tokens.numel(), subset)
    return {"heldout_loss": round(loss, 5), "heldout_ppl": round(math.exp(loss), 3),
            "heldout_tokens": int(eval_tokens.numel()), "seq_len": seq_len, "probe_loss": round(subset, 5),
            "probe_windows": int(probe.shape[0]), "weights": "bf16 file loaded as fp32"}


def _write_splits(folder: Path, corpus: Corpus, tokens: dict[str, torch.Tensor], eos_token_id: int) -> None:
    """splits.json for all three splits; token files for the held-out two (train is never shipped)."""
    records = {}
    for split in corpus.splits():
        records[split.name] = split_record(split, tokens[split.name])
        if split.name != "train":
            write_token_file(folder / f"{split.name}.safetensors", tokens[split.name], split, eos_token_id)
    atomic_write_json(folder / "splits.json", {"schema_version": SCHEMA_VERSION, "splits": records})


def main(config: TrainConfig) -> TrainSummary:
    """Run the whole pipeline and write `config.out`."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    corpus = load_corpus(config.corpus)
    tokenizer, tokens = _tokenize(corpus, config)
    hf_config = to_hf_config(config.model, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = build_model(hf_config, config.seed)
    params = count_parameters(model)
    log.info("model: %d parameters, experts implementation %s", params, EXPERTS_IMPLEMENTATION)
    probe = spread_windows(tokens["evaluation"], config.loop.seq_len, config.probe_windows)
    result = run_training(model, tokens["train"], probe, config.model.router_aux_loss_coef, config.loop)
    with atomic_dir(config.out) as tmp:
        tmp.chmod(0o755)  # Note: mkdtemp creates 0700; the folder is shipped and read by other users
        tokenizer.save_pretrained(str(tmp))
        save_bf16(model, tmp)
        final = _final_eval(tmp, tokens["evaluation"], probe, config.loop.seq_len)
        _write_splits(tmp, corpus, tokens, tokenizer.eos_token_id)
        file_bytes = (tmp / "model.safetensors").stat().st_size
        record = _training_record(config, result, final, time.perf_counter() - started, params, file_bytes)
        atomic_write_json(tmp / "TRAINING.json", record)
    return TrainSummary(config.out, params, file_bytes, result.steps, result.tokens, result.train_seconds,
                        final["heldout_loss"], final["probe_loss"])


def cli(argv: list[str] | None = None) -> TrainSummary:
    """Entry point for `python -m mixprec.bundled.train`; configures logging, then calls `main`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = main(config_from_args(build_parser().parse_args(argv)))
    log.info("done: %s", summary)
    return summary


if __name__ == "__main__":
    cli()
