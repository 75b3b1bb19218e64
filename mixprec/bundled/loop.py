"""Training loop and held-out evaluation for the bundled model.

The loop runs against a wall-clock budget rather than a fixed step count, because the point is the
best model two CPU cores can make in a few minutes: the cosine schedule is driven by the fraction of
the budget used (or of `max_steps`, whichever is further along), so the learning rate reaches its
floor just as time runs out. The LM loss is computed here rather than taken from `out.loss`, which
includes the router aux loss when router logits are requested (FIELD.md section 6.4).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mixprec.core.progress import progress

__all__ = [
    "LoopConfig",
    "CurvePoint",
    "LoopResult",
    "lm_loss",
    "spread_windows",
    "heldout_loss",
    "probe_loss",
    "run_training",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """Optimiser, batch and budget settings for one training run.

    `budget_seconds` is wall-clock time spent in training steps; the periodic held-out probes are
    not charged to it, so probing more often does not shorten training. `cpu_budget_seconds`, if
    set, also stops the run once the steps have used that much CPU time per thread: on a machine
    shared with other jobs the wall clock says little about how much training was done, while CPU
    time per thread is about the wall time the same run takes on an idle machine.
    """

    budget_seconds: float = 600.0
    cpu_budget_seconds: float | None = None
    max_steps: int | None = None
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16_autocast: bool = True
    log_every: int = 10
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be positive, got {self.budget_seconds}")
        if self.cpu_budget_seconds is not None and self.cpu_budget_seconds <= 0:
            raise ValueError(f"cpu_budget_seconds must be positive or None, got {self.cpu_budget_seconds}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        for name in ("batch_size", "seq_len", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.lr < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"need 0 < lr < 1 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")


@dataclass
class CurvePoint:
    """One row of the loss curve; `heldout_loss` is set only on evaluation steps."""

    step: int
    tokens: int
    seconds: float
    cpu_seconds_per_thread: float
    lr: float
    train_loss: float | None = None
    heldout_loss: float | None = None


@dataclass
class LoopResult:
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    cpu_seconds_per_thread: float = 0.0
    curve: list[CurvePoint] = field(default_factory=list)


def _autocast(enabled: bool) -> torch.autocast | nullcontext[None]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def lm_loss(model: torch.nn.Module, window: torch.Tensor, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy, router aux loss) for a [B, T+1] batch of token windows.

    Logits are cast to fp32 before the softmax so the loss is exact even under bf16 autocast.
    """
    inputs, targets = window[:, :-1].long(), window[:, 1:].long()
    with _autocast(bf16):
        out = model(input_ids=inputs, output_router_logits=True, use_cache=False)
    logits = out.logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    aux = out.aux_loss.float() if out.aux_loss is not None else torch.zeros(())
    return loss, aux


def spread_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of seq_len+1 tokens spread evenly over `tokens`, as a [count, T+1] tensor.

    Even spacing rather than the first windows: the first windows all come from the first few
    files, and a loss measured there can differ from the whole split by more than 0.5 nats.
    """
    last = tokens.numel() - seq_len - 1
    if last < 0:
        raise ValueError(f"{tokens.numel()} tokens are too few for one window of {seq_len + 1}")
    starts = torch.linspace(0, last, count).round().long().unique()
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def _tiled_windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows with stride seq_len, so every token but the first is predicted exactly once."""
    count = (tokens.numel() - 1) // seq_len
    windows = [tokens[i * seq_len : (i + 1) * seq_len + 1] for i in range(count)]
    tail = tokens[count * seq_len :]
    return torch.stack(windows), tail


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_tokens: int = 8192) -> float:
    """Mean next-token loss (nats) over all of `tokens`, in fp32, in windows of seq_len context.

    Batches are sized in tokens, not windows: on a busy CPU each op pays a fixed thread-sync cost,
    so many small forwards of a tiny model are far slower than a few large ones.
    """
    was_training = model.training
    model.eval()
    windows, tail = _tiled_windows(tokens, seq_len)
    total, count = 0.0, 0
    batch_size = max(1, batch_tokens // seq_len)
    chunks = list(windows.split(batch_size)) + ([tail.unsqueeze(0)] if tail.numel() > 1 else [])
    for chunk in chunks:
        loss, _ = lm_loss(model, chunk)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count


def _batches(tokens: torch.Tensor, cfg: LoopConfig, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Non-overlapping training windows in a fresh random order each epoch."""
    windows, _ = _tiled_windows(tokens, cfg.seq_len)
    if windows.shape[0] < cfg.batch_size:
        raise ValueError(f"train split has {windows.shape[0]} windows, fewer than batch_size {cfg.batch_size}")
    while True:
        order = torch.randperm(windows.shape[0], generator=gen)
        for i in range(0, order.numel() - cfg.batch_size + 1, cfg.batch_size):
            yield windows[order[i : i + cfg.batch_size]]


def _progress(cfg: LoopConfig, result: LoopResult) -> float:
    """Fraction of the run done: the furthest along of wall budget, CPU budget and step limit."""
    fraction = result.train_seconds / cfg.budget_seconds
    if cfg.cpu_budget_seconds is not None:
        fraction = max(fraction, result.cpu_seconds_per_thread / cfg.cpu_budget_seconds)
    if cfg.max_steps is not None:
        fraction = max(fraction, result.steps / cfg.max_steps)
    return fraction


def _lr_at(cfg: LoopConfig, result: LoopResult) -> float:
    """Linear warmup by step, times a cosine over the run's progress down to min_lr_ratio."""
    warm = min(1.0, (result.steps + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(_progress(cfg, result), 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and expert tensors only, not on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


def run_training(
    model: torch.nn.Module, train_tokens: torch.Tensor, probe: torch.Tensor, aux_coef: float, cfg: LoopConfig
) -> LoopResult:
    """Train `model` in place until the budget or `max_steps` runs out; `probe` is the held-out subset."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt, result, recent = _optimizer(model, cfg), LoopResult(), []
    model.train()
    # The budget is time or steps, whichever runs out first, so the bar counts steps (total when capped).
    for window in progress(_batches(train_tokens, cfg, gen), desc="training", unit="step", total=cfg.max_steps):
        lr = _lr_at(cfg, result)
        started, cpu_started = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = lr
        loss, aux = lm_loss(model, window, cfg.bf16_autocast)
        (loss + aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.train_seconds += time.perf_counter() - started
        result.cpu_seconds_per_thread += (time.process_time() - cpu_started) / torch.get_num_threads()
        result.steps += 1
        result.tokens += window.shape[0] * (window.shape[1] - 1)
        recent.append(loss.item())
        if not math.isfinite(recent[-1]):
            raise FloatingPointError(f"training loss is {recent[-1]} at step {result.steps}; lower --lr")
        done = _progress(cfg, result) >= 1.0
        _record(model, probe, cfg, result, lr, recent, done)
        if done:
            return result
    raise AssertionError("unreachable: the batch iterator is infinite")


def _record(
    model: torch.nn.Module, probe: torch.Tensor, cfg: LoopConfig, result: LoopResult, lr: float,
    recent: list[float], done: bool,
) -> None:
    """Append a curve point every `log_every` steps, with a held-out loss every `eval_every`."""
    step = result.steps
    if step % cfg.log_every and step % cfg.eval_every and not done and step != 1:
        return
    point = CurvePoint(
        step, result.tokens, round(result.train_seconds, 2), round(result.cpu_seconds_per_thread, 2), lr,
        round(sum(recent) / len(recent), 4),
    )
    recent.clear()
    if step % cfg.eval_every == 0 or done or step == 1:
        point.heldout_loss = round(probe_loss(model, probe), 4)
    result.curve.append(point)
    log.info(
        "step %d  tokens %d  %.0fs  lr %.2e  train %.3f%s", step, result.tokens, result.train_seconds,
        lr, point.train_loss, f"  held-out {point.heldout_loss:.3f}" if point.heldout_loss is not None else "",
    )


@torch.no_grad()
def probe_loss(model: torch.nn.Module, probe: torch.Tensor, batch_tokens: int = 8192) -> float:
    """Mean loss over a fixed [N, T+1] set of held-out windows, in fp32."""
    was_training = model.training
    model.eval()
    batch_size = max(1, batch_tokens // probe.shape[1])
    losses = [lm_loss(model, chunk)[0].item() * chunk.shape[0] for chunk in probe.split(batch_size)]
    model.train(was_training)
    return sum(losses) / probe.shape[0]
