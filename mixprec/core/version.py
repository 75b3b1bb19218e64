"""The package version, kept in core so every stage can record it without importing the package root."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
