"""The defaults of quantize, measure and search that depend on the model and the other flags.

**`--granularity auto`**: the finest groups the target can hold.

A width per routed expert, and per projection within it, is what pays most on MoE models (on the bundled
model 0.61-0.91x the held-out KL of one width per layer's experts, and gate+up apart from down another
0.93-0.97x), and split mode gets those rows from the fine table for one extra forward pass. But only
mixprec's compiled format (and `mixprec.load`) holds per-expert widths: llama.cpp keeps one ggml type per
layer and projection of the experts, vLLM fuses every expert of a layer, and exllamav3's fused MoE
kernels want one width per layer and projection. So `auto` means `expert-fine` with `--mode split` for a
model with routed experts, and `fine` wherever the run says the recipe goes elsewhere: ggml types
(`--method gguf*`), an exllamav3 export, an explicit drop or raise table, or a model without experts.

**Options** (no `--options`, `--group-size` or `--method` given): GPTQ at group sizes 64, 32 and 128, each
group choosing its width and group size jointly. GPTQ's error compensation is what carries recipes at 2-3
bits (on the bundled model GPTQ's uniform KL is 0.19-0.22x RTN's at 2-4 bits, and RTN recipes cannot reach
a bit of gain at 2.5-3 bpw: every group must stay at >= 2 bits), and it costs one calibration pass and a
solve per matrix and width, small beside the measurement it feeds (35 s against ~10 min on the bundled
model). It needs calibration text and room for its Hessians, one layer's at a time (`layer_hessian_bytes`):
where they would take more than half of the memory available (or of `--max-memory`), or the model folder
has no tokenizer that reads text (and no `--calib-data`), the default falls back to RTN at the same group
sizes, which needs neither, and says so. Every group size costs another fine table on the same tokens (split
mode shares one importance pass), and it pays: per-group group sizes gave recipes 0.78-0.94x the KL of one
group size, mostly by putting 3-4-bit groups at g128 and keeping g64 where 2 bits need it. `--options`
with no family, any `--group-size` or another method gives one group size; so do raise tables and a shared
`measure --storage` (one table per storage). `quantize` follows the same rule, so `quantize`, `measure
--no-quantize` and `search --no-measure` agree.
"""

from __future__ import annotations

import argparse
import logging

import torch

from mixprec.model.arch import GroupKind
from mixprec.model.loading import Checkpoint, resolve_model_path
from mixprec.model.modelmap import Granularity
from mixprec.model.streaming import available_memory
from mixprec.quant import QuantSettings, quantizer_class
from mixprec.quant.ggml import GGMLQuantizer
from mixprec.quant.hessians import layer_hessian_bytes
from mixprec.quant.options import parse_families

__all__ = ["AUTO", "GRANULARITY_CHOICES", "DEFAULT_OPTIONS", "RTN_OPTIONS", "default_options", "resolve_granularity",
           "resolve_options"]

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_OPTIONS = ("gptq-g64", "gptq-g32", "gptq-g128")
#: The fallback where one layer's GPTQ Hessians do not fit: the same group sizes, no calibration needed.
RTN_OPTIONS = ("rtn-g64", "rtn-g32", "rtn-g128")
_SAMPLE_TEXT = "def mean(values):\n    return sum(values) / len(values)  # The average of the values.\n"
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


def _reads_text(model: str | None) -> bool:
    """Whether the model folder's tokenizer turns code and prose into tokens (GPTQ calibrates on text; a folder of
    token files without a tokenizer cannot be calibrated that way)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), local_files_only=True)
        ids = tokenizer(_SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    except (OSError, ValueError, TypeError):
        return False
    return sum(1 for i in ids if i != tokenizer.eos_token_id) >= 4


def default_options(model: str | None, memory: int | None = None, calib_data: bool = False) -> list[str]:
    """GPTQ at three group sizes where it can run: one layer's Hessians take at most half of `memory` (default:
    what is available now) and there is calibration text the tokenizer reads (`calib_data` given, or a tokenizer
    that reads the default text); else RTN at the same sizes. The log says which and why."""
    need = layer_hessian_bytes(Checkpoint.open(model).model_map(Granularity.FINE))
    memory = available_memory(torch.device("cpu")) if memory is None else memory
    if 2 * need > memory:
        log.warning("options: %s, not GPTQ: one layer's GPTQ Hessians would take %.1f GB, more than half of the %.1f "
                    "GB available (give --max-memory or --options gptq-g64 ... to insist)", " ".join(RTN_OPTIONS),
                    need / 1e9, memory / 1e9)
        return list(RTN_OPTIONS)
    if not calib_data and not _reads_text(model):
        log.warning("options: %s, not GPTQ: the model folder has no tokenizer that reads text to calibrate GPTQ on "
                    "(give --calib-data FILES with a tokenizer, or --options gptq-g64 ... to insist)",
                    " ".join(RTN_OPTIONS))
        return list(RTN_OPTIONS)
    log.info("options: %s (one layer's GPTQ Hessians take %.2f GB of %.1f GB available)",
             " ".join(DEFAULT_OPTIONS), need / 1e9, memory / 1e9)
    return list(DEFAULT_OPTIONS)


def resolve_options(args: argparse.Namespace, default_group_size: int | list[int]) -> None:
    """Fill an unset `args.options` (None) with the default families (`default_options`) when nothing asked for
    one setting, and an unset `args.group_size` with `default_group_size`, in place."""
    one_setting = (args.group_size is not None or args.method != QuantSettings.method
                   or getattr(args, "mode", None) == "raise" or getattr(args, "storage", None) is not None)
    if args.options is None:
        args.options = [] if one_setting else default_options(args.model, getattr(args, "max_memory", None),
                                                              bool(getattr(args, "calib_data", None)))
    if args.group_size is None:
        args.group_size = default_group_size
