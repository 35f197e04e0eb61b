"""Errors a user can cause. The CLI catches `KvedgeError` once and prints a one-line message, exit 2."""

from __future__ import annotations


class KvedgeError(Exception):
    """Base of every failure caused by the user's input or environment (not a bug in kvedge)."""


class ModelFileError(KvedgeError):
    """The model file is missing, truncated, not a GGUF, or llama.cpp refused to load it."""


class DefaultModelMissing(KvedgeError):
    """No model argument was given and the embedded default model is not installed."""


class KVTypeError(KvedgeError):
    """A KV cache type llama.cpp does not accept, or a malformed K/V spec."""


class PromptFileError(KvedgeError):
    """A user prompt file that cannot be read or lacks the documented columns."""


class EmptyPromptSet(KvedgeError):
    """The selection of benchmarks, split and limit left no prompt to run."""


class StoreError(KvedgeError):
    """The results store cannot be written (disk full, read-only, corrupt database)."""


class RunDirError(KvedgeError):
    """An audit directory given to `compare` or `report` holds no usable audit."""


class UnknownName(KvedgeError):
    """A detector, benchmark or noise variant name that no registry holds."""


class TemplateError(KvedgeError):
    """The GGUF's chat template failed to render in the sandbox."""


class DetectorError(KvedgeError):
    """A detector spec, refusal-phrase file or judge model that cannot be used."""


class ServerError(KvedgeError):
    """A server given with --server is unreachable, malformed, or not what the store or the model says."""

class SchemeError(KvedgeError):
    """A KV fake-quantization scheme name kvedge does not know, or one that does not fit the cache row."""


class UnsupportedArchitecture(KvedgeError):
    """The GGUF's architecture (or one of its features) has no torch forward in kvedge."""


class NativeUnavailable(KvedgeError):
    """A per-layer KV config was asked for, and the native build is missing or cannot be loaded here."""


class PatchError(KvedgeError):
    """The patched file cannot be written (no space, unwritable directory)."""


class DeploymentError(KvedgeError):
    """A deployment folder that is not what its export wrote."""


class ExportError(KvedgeError):
    """The deployment folder cannot be used or written."""
