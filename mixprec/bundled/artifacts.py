"""Files the training run leaves in the model folder, next to the weights and tokenizer.

`splits.json` says exactly which stdlib files and text (sha256) each split holds;
`calibration.safetensors` and `evaluation.safetensors` hold their token ids. The token files are
the source of truth for later stages: a machine with a different Python patch release has slightly
different stdlib sources, but must measure on identical tokens.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixprec.bundled.corpus import CorpusSplit

__all__ = [
    "SCHEMA_VERSION",
    "TOKENS_KEY",
    "split_record",
    "write_token_file",
    "read_token_file",
    "save_bf16",
]

SCHEMA_VERSION = 1
TOKENS_KEY = "tokens"


def split_record(split: CorpusSplit, tokens: torch.Tensor) -> dict[str, Any]:
    """The `splits.json` entry of one split: files, text hash, and sizes."""
    return {
        "num_files": len(split.files),
        "files": split.rel_paths,
        "text_sha256": split.sha256(),
        "num_bytes": split.num_bytes,
        "num_tokens": int(tokens.numel()),
        "python_version": platform.python_version(),
    }


def write_token_file(path: Path, tokens: torch.Tensor, split: CorpusSplit, eos_token_id: int) -> None:
    """Save one split's token ids as a 1-D int32 tensor named `tokens`, with provenance metadata."""
    if tokens.dim() != 1 or tokens.dtype != torch.int32:
        raise ValueError(f"expected a 1-D int32 tensor, got {tokens.dim()}-D {tokens.dtype}")
    metadata = {
        "split": split.name,
        "text_sha256": split.sha256(),
        "num_files": str(len(split.files)),
        "eos_token_id": str(eos_token_id),
        "layout": "file token ids concatenated in splits.json order, eos after each file",
        "schema_version": str(SCHEMA_VERSION),
    }
    save_file({TOKENS_KEY: tokens.contiguous()}, str(path), metadata=metadata)


def read_token_file(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(tokens, metadata) of a file written by `write_token_file`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if TOKENS_KEY not in handle.keys():
            raise KeyError(f"{path} has no tensor named {TOKENS_KEY!r}; it was not written by mixprec")
        return handle.get_tensor(TOKENS_KEY), metadata


def save_bf16(model: torch.nn.Module, folder: Path) -> None:
    """Save a bf16 copy of `model` with `save_pretrained`, leaving `model` itself untouched.

    Note: `.to(torch.bfloat16)` also rounds the rotary `inv_freq` buffer and casting back does not
    restore it (FIELD.md section 6.4), so the cast happens on a deep copy; buffers are not saved.
    """
    shipped = copy.deepcopy(model).to(torch.bfloat16)
    shipped.save_pretrained(str(folder))
