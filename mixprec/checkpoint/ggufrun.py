"""A GGUF file run by llama.cpp itself (llama-cpp-python), as a candidate model for `mixprec eval` and the demo.

The point of scoring a GGUF in llama.cpp rather than dequantizing it into transformers is that llama.cpp's
own kernels (which quantize activations to 8 bits inside their dot products) are what a user of the file
runs. `LlamaCppModel` gives llama.cpp the interface `mixprec.checkpoint.evaluate.compare_models` calls
(`model(input_ids=...).logits`), so a GGUF gets exactly the statistics, windows and bootstrap of any
other candidate. llama-cpp-python is an optional dependency (the `gguf` extra that runs/setup.sh builds);
nothing here imports it until a GGUF is opened.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mixprec.checkpoint.qformat import META_RECIPE
from mixprec.core.errors import ModelLoadError
from mixprec.formats.recipe import Recipe

__all__ = ["GGUF_MISSING", "llama_cpp_available", "is_gguf", "gguf_recipe", "LlamaCppModel"]

#: What a machine without the `gguf` extra is told (MIXPREC_NO_GGUF=1 setups skip building it).
GGUF_MISSING = ("llama-cpp-python is not installed (a MIXPREC_NO_GGUF=1 setup); "
                "`bash runs/setup.sh` or pip install 'mixprec[gguf]' adds it")


def llama_cpp_available() -> bool:
    """True when both llama-cpp-python (to run a GGUF) and the gguf package (to write one) import."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf"))


def is_gguf(path: str | Path) -> bool:
    """True for a file that starts with GGUF's magic bytes (what llama.cpp checks before anything else)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def gguf_recipe(path: str | Path) -> Recipe | None:
    """The recipe a mixprec-written GGUF carries (`mixprec.recipe`), or None for any other GGUF."""
    if not llama_cpp_available():
        raise ModelLoadError(f"{path} is a GGUF file; reading it needs {GGUF_MISSING}")
    import gguf

    field = gguf.GGUFReader(Path(path)).get_field(META_RECIPE)
    if field is None:
        return None
    return Recipe.from_yaml(bytes(field.parts[field.data[0]]).decode("utf-8"), where=f"{path}: {META_RECIPE}")


class LlamaCppModel(torch.nn.Module):
    """llama.cpp's forward pass over a GGUF, one window at a time, logits of every position in fp32.

    The context is created on the first call, as long as the longest window seen (a longer window
    re-creates it), because llama.cpp fixes its context size when the context is made.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        if importlib.util.find_spec("llama_cpp") is None:
            raise ModelLoadError(f"{path} is a GGUF file; running it needs {GGUF_MISSING}")
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self._llm: Any = None
        self._n_ctx = 0

    def _context(self, length: int) -> Any:
        if self._llm is None or length > self._n_ctx:
            import llama_cpp

            self.close()
            self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=length, n_batch=length, logits_all=True,
                                        verbose=False, n_threads=self.threads)
            self._n_ctx = length
        return self._llm

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        """Logits [batch, positions, vocab] for each row of `input_ids`, each row evaluated from an empty cache."""
        llm = self._context(int(input_ids.shape[1]))
        rows = []
        for tokens in input_ids.tolist():
            llm.reset()
            llm.eval(tokens)
            rows.append(torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))

    def close(self) -> None:
        """Free llama.cpp's model and context now instead of at garbage collection."""
        if self._llm is not None:
            self._llm.close()
            self._llm = None
