"""The compiled formats `mixprec compile --format NAME` can write, and the function that writes each.

Every format compiles the same inputs (a recipe, the source checkpoint, the work folder with its
variants, an output path and a `CompileConfig`) and returns its compile report (a JSON-able dict, also
written next to the output). A format is one `CompiledFormat` entry below; its writer is imported only
when that format is used, so a format whose writer needs an optional package costs nothing otherwise
and importing this module registers nothing at run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixprec.checkpoint.qformat import CompileError

if TYPE_CHECKING:
    from mixprec.checkpoint.compile import CompileConfig
    from mixprec.formats.recipe import Recipe
    from mixprec.model.loading import Checkpoint

__all__ = ["CompiledFormat", "COMPILED_FORMATS", "DEFAULT_FORMAT", "format_names", "compiled_format"]

#: recipe, source checkpoint, work folder, output path, config -> compile report
Writer = Callable[["Recipe", "Checkpoint", Path, Path, "CompileConfig"], dict[str, Any]]


@dataclass(frozen=True)
class CompiledFormat:
    """A compiled output format: its CLI name, one line of help, and where its writer lives."""

    name: str
    help: str
    module: str
    function: str

    def __post_init__(self) -> None:
        if not self.module.startswith("mixprec.checkpoint."):
            raise CompileError(f"compiled format {self.name!r}: writer module {self.module!r} must live in "
                               "mixprec.checkpoint")

    def writer(self) -> Writer:
        """The function that compiles a recipe into this format (imported on first use)."""
        return getattr(importlib.import_module(self.module), self.function)


#: name -> format; the first is the default.
COMPILED_FORMATS: dict[str, CompiledFormat] = {
    fmt.name: fmt
    for fmt in (
        CompiledFormat("mixprec", "mixprec's bit-packed safetensors; loads with mixprec.load and mixprec eval",
                       "mixprec.checkpoint.compile", "compile_recipe"),
        CompiledFormat("compressed-tensors", "vLLM's compressed-tensors pack-quantized safetensors (int32-packed "
                       "codes, one config group per width and group size)", "mixprec.checkpoint.ctensors",
                       "compile_ctensors"),
        CompiledFormat("gguf", "one llama.cpp GGUF file (--out FILE), every tensor in its ggml type; recipes of "
                       "--method gguf / gguf-imatrix / gguf-iq", "mixprec.checkpoint.gguf", "compile_gguf"),
    )
}
DEFAULT_FORMAT = next(iter(COMPILED_FORMATS))


def format_names() -> list[str]:
    return list(COMPILED_FORMATS)


def compiled_format(name: str) -> CompiledFormat:
    """The format called `name`, or an error listing the known ones."""
    try:
        return COMPILED_FORMATS[name]
    except KeyError:
        raise CompileError(f"unknown compiled format {name!r}; choose one of {format_names()}") from None
