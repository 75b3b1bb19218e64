"""KL(reference ‖ quantized) per token and the statistic set quant publishers quote.

Direction and conventions follow llama.cpp and exllamav3 (FIELD.md §8): KL(p_ref ‖ p_q) summed over
the vocabulary per position, log-softmax in fp32, computed in row chunks so positions × vocabulary
never sits in memory at once. Uncertainty is a bootstrap over sequences, not over tokens: tokens of
one sequence are correlated, so a per-token standard error would be far too optimistic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "TokenComparison",
    "KLSummary",
    "compare_logits",
    "summarize",
    "bootstrap_se",
    "paired_difference",
    "CONFIDENCE_BINS",
]

#: Reference top-1 probability bins for exllamav3-style confidence buckets.
CONFIDENCE_BINS = (0.0, 0.25, 0.5, 0.75, 0.95, 1.0000001)


@dataclass
class TokenComparison:
    """Per-position results of comparing two models on the same tokens (all 1-D, same length)."""

    kl: torch.Tensor
    same_top1: torch.Tensor
    ref_logp_label: torch.Tensor
    q_logp_label: torch.Tensor
    ref_top1_prob: torch.Tensor

    @staticmethod
    def cat(parts: list[TokenComparison]) -> TokenComparison:
        return TokenComparison(*(torch.cat([getattr(p, f) for p in parts]) for f in TokenComparison.__annotations__))


def compare_logits(ref_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor,
                   chunk_rows: int = 512) -> TokenComparison:
    """Compare [N, V] logits row-chunk by row-chunk in fp32; `labels` [N] are the next tokens."""
    parts = []
    for start in range(0, ref_logits.shape[0], chunk_rows):
        ref = torch.log_softmax(ref_logits[start : start + chunk_rows].float(), dim=-1)
        q = torch.log_softmax(q_logits[start : start + chunk_rows].float(), dim=-1)
        label = labels[start : start + chunk_rows].unsqueeze(-1)
        parts.append(TokenComparison(
            kl=(ref.exp() * (ref - q)).sum(-1).clamp_min(0.0),
            same_top1=ref.argmax(-1) == q.argmax(-1),
            ref_logp_label=ref.gather(-1, label).squeeze(-1),
            q_logp_label=q.gather(-1, label).squeeze(-1),
            ref_top1_prob=ref.max(-1).values.exp(),
        ))
    return TokenComparison.cat(parts)


def bootstrap_se(per_sequence: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> float:
    """Standard error of the mean of `per_sequence` values, by bootstrap over sequences."""
    n = per_sequence.numel()
    if n < 2:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (n_boot, n), generator=generator)
    return float(per_sequence.double()[picks].mean(dim=1).std())


def paired_difference(kl_a: torch.Tensor, kl_b: torch.Tensor, num_sequences: int,
                      n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean of KL_a − KL_b on the same tokens and its bootstrap standard error (over sequences).

    Pairing removes the variance the two candidates share (hard tokens are hard for both), which is
    what lets two close recipes be told apart with few tokens.
    """
    diff = (kl_a.double() - kl_b.double()).view(num_sequences, -1).mean(dim=1)
    return float(diff.mean()), bootstrap_se(diff, n_boot, seed)


@dataclass(frozen=True)
class KLSummary:
    """llama.cpp's KLD statistic set plus exllamav3's confidence buckets, with ± on every mean."""

    n_tokens: int
    n_sequences: int
    kl_mean: float
    kl_se: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    same_top1: float
    same_top1_se: float
    rms_dp: float
    rms_dp_se: float
    ppl_ref: float
    ppl_q: float
    ln_ppl_ratio: float
    bucket_kl_mean: tuple[float, ...]
    bucket_counts: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q)) if values.numel() else float("nan")


def _buckets(cmp: TokenComparison) -> tuple[tuple[float, ...], tuple[int, ...]]:
    means, counts = [], []
    for lo, hi in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:], strict=True):
        mask = (cmp.ref_top1_prob >= lo) & (cmp.ref_top1_prob < hi)
        counts.append(int(mask.sum()))
        means.append(float(cmp.kl[mask].double().mean()) if mask.any() else float("nan"))
    return tuple(means), tuple(counts)


def summarize(cmp: TokenComparison, num_sequences: int, n_boot: int = 1000, seed: int = 0) -> KLSummary:
    """Aggregate a comparison of `num_sequences` equal-length sequences into the statistic set."""
    n = cmp.kl.numel()
    if num_sequences < 1 or n % num_sequences:
        raise ValueError(f"{n} tokens cannot be split into {num_sequences} equal sequences")
    per_seq = lambda t: t.double().view(num_sequences, -1).mean(dim=1)  # noqa: E731
    dp = cmp.q_logp_label.exp() - cmp.ref_logp_label.exp()
    same = cmp.same_top1.double()
    rms_dp = float((dp.double() ** 2).mean().sqrt())
    means, counts = _buckets(cmp)
    return KLSummary(
        n_tokens=n, n_sequences=num_sequences,
        kl_mean=float(cmp.kl.double().mean()), kl_se=bootstrap_se(per_seq(cmp.kl), n_boot, seed),
        kl_median=_quantile(cmp.kl, 0.5), kl_p90=_quantile(cmp.kl, 0.9), kl_p99=_quantile(cmp.kl, 0.99),
        kl_p999=_quantile(cmp.kl, 0.999), kl_max=float(cmp.kl.max()),
        same_top1=float(same.mean()), same_top1_se=bootstrap_se(per_seq(same), n_boot, seed),
        # delta method: se(sqrt(m)) = se(m) / (2 sqrt(m))
        rms_dp=rms_dp, rms_dp_se=bootstrap_se(per_seq(dp**2), n_boot, seed) / (2 * max(rms_dp, 1e-30)),
        ppl_ref=float(torch.exp(-cmp.ref_logp_label.double().mean())),
        ppl_q=float(torch.exp(-cmp.q_logp_label.double().mean())),
        ln_ppl_ratio=float((cmp.ref_logp_label.double() - cmp.q_logp_label.double()).mean()),
        bucket_kl_mean=means, bucket_counts=counts,
    )
