"""mixprec: sensitivity-driven mixed-precision recipe optimizer for LLMs, above all MoE models.

Importing the package has no side effects: no torch settings change, nothing touches the GPU,
the network or logging. Heavy submodules are imported lazily by the names below.
"""

from __future__ import annotations

from typing import Any

from mixprec.core.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    """Lazy public names: `mixprec.load` imports torch and transformers only when first used."""
    if name == "load":
        from mixprec.checkpoint.streamed import load  # whole, or one layer at a time when it does not fit

        return load
    raise AttributeError(f"module 'mixprec' has no attribute {name!r}")
