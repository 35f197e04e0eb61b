"""Errors a user can cause in the torch calibration side (see kvedge.errors for the convention)."""

from __future__ import annotations

from ..errors import KvedgeError


class SchemeError(KvedgeError):
    """A KV fake-quantization scheme name kvedge does not know, or one that does not fit the cache row."""


class UnsupportedArchitecture(KvedgeError):
    """The GGUF's architecture (or one of its features) has no torch forward in kvedge."""
