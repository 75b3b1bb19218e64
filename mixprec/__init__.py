"""mixprec: sensitivity-driven mixed-precision recipe optimizer for LLMs, above all MoE models.

Importing the package has no side effects: no torch settings change, nothing touches the GPU,
the network or logging. Heavy submodules are imported lazily by the names below.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
