"""Typed errors: every user-facing failure names the file, key or value and the fix.

The CLI turns a `MixprecError` into a one-line message and exit code 2 instead of a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "MixprecError",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "QuantConfigError",
    "VariantError",
    "FingerprintMismatchError",
]


class MixprecError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class ModelLoadError(MixprecError):
    """The model folder is missing, incomplete, corrupt, or not a causal LM."""


class UnsupportedArchitectureError(MixprecError):
    """No architecture adapter knows this `model_type`."""


class QuantConfigError(MixprecError):
    """A quantizer setting is out of range."""


class VariantError(MixprecError):
    """A quantized variant on disk is missing, corrupt or inconsistent with its manifest."""


class FingerprintMismatchError(MixprecError):
    """Two artifacts were made from different models, variants or data and must not be mixed."""
