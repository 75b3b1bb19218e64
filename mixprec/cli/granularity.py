"""`--granularity auto` (the default of measure and search): the finest groups the target can hold.

A width per routed expert, and per projection within it, is what pays most on MoE models (on the bundled
model 0.61-0.91x the held-out KL of one width per layer's experts, and gate+up apart from down another
0.93-0.97x), and split mode gets those rows from the fine table for one extra forward pass. But only
mixprec's compiled format (and `mixprec.load`) holds per-expert widths: llama.cpp keeps one ggml type per
layer and projection of the experts, vLLM fuses every expert of a layer, and exllamav3's fused MoE
kernels want one width per layer and projection. So `auto` means `expert-fine` with `--mode split` for a
model with routed experts, and `fine` wherever the run says the recipe goes elsewhere: ggml types
(`--method gguf*`), an exllamav3 export, an explicit drop or raise table, or a model without experts.
"""

from __future__ import annotations

import argparse
import logging

from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import Granularity
from mixprec.quant import QuantSettings, quantizer_class
from mixprec.quant.ggml import GGMLQuantizer
from mixprec.quant.options import parse_families

__all__ = ["AUTO", "GRANULARITY_CHOICES", "resolve_granularity"]

log = logging.getLogger(__name__)

AUTO = "auto"
GRANULARITY_CHOICES = [AUTO, *(g.value for g in Granularity)]


def _has_routed_experts(model: str | None) -> bool:
    groups = Checkpoint.open(model).model_map(Granularity.FINE).select([GroupKind.ROUTED_EXPERTS])
    return bool(groups)


def _elsewhere(args: argparse.Namespace) -> str | None:
    """Why this run's recipe must keep one width per layer's experts, or None."""
    options = getattr(args, "options", None)
    families = parse_families(options, QuantSettings(method=args.method)) if options else ()
    if any(issubclass(quantizer_class(m), GGMLQuantizer) for m in {args.method, *(f.method for f in families)}):
        return "ggml types: llama.cpp holds one type per layer and projection of the experts"
    if getattr(args, "export_exl3", None) is not None:
        return "--export-exl3: exllamav3's fused MoE kernels want one width per layer and projection"
    if args.mode not in (None, "split"):
        return f"--mode {args.mode} measures the groups it searches"
    return None


def resolve_granularity(args: argparse.Namespace) -> None:
    """Replace `auto` in `args.granularity` (and an unset `args.mode`) by what this run can use, in place."""
    if args.granularity != AUTO:
        args.mode = args.mode or "drop"
        return
    reason = _elsewhere(args)
    if reason is None and not _has_routed_experts(args.model):
        reason = "the model has no routed experts"
    if reason is None:
        args.granularity, args.mode = Granularity.EXPERT_FINE.value, "split"
        log.info("--granularity auto: expert-fine (a width per routed expert and projection, split from the fine "
                 "table); mixprec's format holds it, give --granularity fine for GGUF, vLLM or exllamav3")
        return
    args.granularity, args.mode = Granularity.FINE.value, args.mode or "drop"
    log.info("--granularity auto: fine (%s)", reason)
