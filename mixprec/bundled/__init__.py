"""The small Qwen2-MoE model that ships with mixprec and is every command's default input.

Sensitivities of a randomly initialised model mean nothing, so mixprec trains its own model on the
Python standard library (`mixprec.bundled.train`) and ships the result in `stdlib-moe/` together
with its tokenizer and the tokenized calibration and evaluation splits. Importing this package only
defines names; nothing is loaded until `bundled_model_path()` is called by the user of the model.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_MODEL_NAME", "bundled_model_path"]

BUNDLED_MODEL_NAME = "stdlib-moe"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def bundled_model_path() -> Path:
    """The folder of the bundled model, checked to hold a config, weights and tokenizer.

    Raises:
        FileNotFoundError: if the folder or one of its key files is missing; the message gives the
            command that recreates it.
    """
    path = Path(__file__).resolve().parent / BUNDLED_MODEL_NAME
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"bundled model at {path} is missing {', '.join(missing)}; recreate it with "
            f"`python -m mixprec.bundled.train --out {path}` (6 CPU-minutes on 2 cores; longer on a busy machine), "
            "or restore it from git with `git checkout -- mixprec/bundled/stdlib-moe`"
        )
    return path
