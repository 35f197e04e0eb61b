"""kvedge's K transform in a GGUF's metadata: read, checked, and written into a copy of a model.

The transform (native/README.md, "K transform"): per layer, KV head and channel of the post-RoPE K row, the
cache stores k' = (k - mu) / s and each query head's Q is multiplied by the s of the KV head it reads, so
q'.k' = q.k - q.mu, the same for every key of a query: softmax and the attention output are unchanged at full
precision, while the cache quantizes a centred and rescaled K.

It is carried as metadata, not tensors, so that a stock llama.cpp loads the file and computes exactly what the
original computes; kvedge's native llama.cpp (native/llama-k-transform.patch) applies it:

- `kvedge.k_transform.version`: uint32, 1 (required with any other kvedge.k_transform.* key)
- `kvedge.k_transform.mu`: float32 array of n_layer * n_head_kv * head_dim_k values, layer-major, each layer's
  block in the K cache row's channel order (head-major); optional, absent = 0
- `kvedge.k_transform.scale`: the same layout, every value finite and > 0; optional, absent = 1

At least one of mu and scale. The native build checks the same rules at model load and refuses the file with
a one-line reason; `validate_k_transform` says the same things here first. Only the llama architecture is
verified.

Pure Python, numpy and gguf-py (no torch): the key names live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ModelFileError, PatchError
from .model import K_TRANSFORM_PREFIX

VERSION = 1
KEY_VERSION = K_TRANSFORM_PREFIX + "version"
KEY_MU = K_TRANSFORM_PREFIX + "mu"
KEY_SCALE = K_TRANSFORM_PREFIX + "scale"
VERIFIED_ARCHS = ("llama",)  # the architectures native/llama-k-transform.patch applies the transform to


@dataclass(frozen=True)
class KTransform:
    """mu and scale, each float32 [n_layer, n_head_kv * head_dim_k] or None (absent: 0 and 1)."""

    mu: np.ndarray | None
    scale: np.ndarray | None

    def layers_with_mu(self) -> int:
        """Layers whose mu is not all zero (the native build's load log counts the same)."""
        return 0 if self.mu is None else int(np.any(np.asarray(self.mu) != 0, axis=-1).sum())

    def layers_with_scale(self) -> int:
        """Layers whose scale is not all one."""
        return 0 if self.scale is None else int(np.any(np.asarray(self.scale) != 1, axis=-1).sum())


def _as_f32(a: Any) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # an out-of-range value becomes inf: reported below
        return np.asarray(a, dtype=np.float32)


def validate_k_transform(kt: KTransform, n_layer: int, n_embd_k_gqa: int, arch: str) -> None:
    """ModelFileError, one line, for a transform the native build would refuse for this model (or a
    llama.cpp that does not apply it to `arch`)."""
    if arch not in VERIFIED_ARCHS:
        raise ModelFileError(f"kvedge.k_transform is verified for the {' and '.join(VERIFIED_ARCHS)} architecture "
                             f"only, not {arch}")
    if kt.mu is None and kt.scale is None:
        raise ModelFileError(f"kvedge.k_transform has neither {KEY_MU} nor {KEY_SCALE}")
    want = n_layer * n_embd_k_gqa
    for key, a in ((KEY_MU, kt.mu), (KEY_SCALE, kt.scale)):
        if a is None:
            continue
        a = _as_f32(a)
        if a.ndim == 2 and a.shape[0] != n_layer:
            raise ModelFileError(f"{key} covers {a.shape[0]} layers, the model has {n_layer}")
        if a.size != want or (a.ndim == 2 and a.shape[1] != n_embd_k_gqa) or a.ndim > 2:
            raise ModelFileError(f"{key} has {a.size} values, expected {want} ({n_layer} layers x "
                                 f"{n_embd_k_gqa} K channels)")
        flat = a.reshape(-1)
        bad = ~np.isfinite(flat) if key == KEY_MU else ~(np.isfinite(flat) & (flat > 0))
        if bad.any():
            i = int(np.argmax(bad))
            where = f"{key}[{i}] (layer {i // n_embd_k_gqa}, channel {i % n_embd_k_gqa})"
            if key == KEY_MU:
                raise ModelFileError(f"{where} is {flat[i]}: every mu must be finite")
            raise ModelFileError(f"{where} is {flat[i]:g}: every scale must be finite and > 0")


def _reader_metadata(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the file's metadata values except string arrays, its kvedge.k_transform.* fields), after kvedge's
    header checks."""
    import gguf

    from .header import read_header

    read_header(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the header passed kvedge's checks: still a file gguf-py cannot read
        raise ModelFileError(f"corrupt GGUF ({type(exc).__name__}: {exc}): {path}") from None
    md: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith(K_TRANSFORM_PREFIX):
            fields[name] = f
        elif not name.startswith("GGUF.") and not (f.types and f.types[0] == gguf.GGUFValueType.ARRAY
                                                  and f.types[-1] == gguf.GGUFValueType.STRING):
            md[name] = f.contents()
    return md, fields


def read_k_transform(path: str | Path, validate: bool = True) -> KTransform | None:
    """The transform `path` carries, or None when it has no kvedge.k_transform.* key. mu and scale come back
    float32 [n_layer, n_embd_k_gqa] (flat when their length does not divide by the file's layer count).
    ModelFileError for a wrong or missing version or a value of the wrong type; with `validate`, also for
    anything `validate_k_transform` refuses against the file's own geometry and architecture."""
    import gguf

    from .model import read_geometry

    path = Path(path)
    md, fields = _reader_metadata(path)
    if not fields:
        return None
    version = fields.get(KEY_VERSION)
    if version is None:
        raise ModelFileError(f"{KEY_VERSION} is missing (it must be {VERSION}): {path.name}")
    if version.types != [gguf.GGUFValueType.UINT32]:
        raise ModelFileError(f"{KEY_VERSION} must be a uint32, not {'/'.join(t.name for t in version.types)}")
    if version.contents() != VERSION:
        raise ModelFileError(f"{KEY_VERSION} is {version.contents()}: kvedge reads version {VERSION} only")
    geo = read_geometry(md, path)
    arrays: dict[str, np.ndarray | None] = {}
    for key in (KEY_MU, KEY_SCALE):
        f = fields.get(key)
        if f is None:
            arrays[key] = None
            continue
        if f.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]:
            raise ModelFileError(f"{key} must be a float32 array")
        a = np.asarray(f.contents(), dtype=np.float32)
        arrays[key] = a.reshape(geo.n_layer, -1) if a.size and a.size % geo.n_layer == 0 else a
    kt = KTransform(mu=arrays[KEY_MU], scale=arrays[KEY_SCALE])
    if validate:
        validate_k_transform(kt, geo.n_layer, geo.n_head_kv * geo.head_dim_k, geo.architecture)
    return kt


def metadata(kt: KTransform) -> dict[str, tuple[Any, Any, Any]]:
    """The transform's metadata for a GGUF writer: key -> (value, GGUFValueType, array element type or None)
    as gguf-py's `GGUFWriter.add_key_value` takes them (arrays as lists of float32 values)."""
    from gguf import GGUFValueType as T

    out: dict[str, tuple[Any, Any, Any]] = {KEY_VERSION: (VERSION, T.UINT32, None)}
    for key, a in ((KEY_MU, kt.mu), (KEY_SCALE, kt.scale)):
        if a is not None:
            out[key] = (_as_f32(a).reshape(-1).tolist(), T.ARRAY, T.FLOAT32)
    return out


def write_with_k_transform(src: str | Path, dst: str | Path, kt: KTransform, provenance: Mapping[str, str]):
    """Copy `src` to `dst` (atomically, after a free-space check; never over `src`) with the transform's
    metadata and `provenance` (string keys) added; every tensor is carried byte for byte and every other key
    as it is. The transform is checked against `src`'s geometry and architecture first (ModelFileError), and a
    file that already carries one is refused (PatchError): transforms do not compose by adding keys.
    Returns gguf_patch's PatchReport."""
    from ..mitigate.gguf_patch import patch_gguf
    from .model import read_geometry

    src, dst = Path(src), Path(dst)
    md, fields = _reader_metadata(src)
    if fields:
        raise PatchError(f"{src.name} already carries a K transform ({', '.join(sorted(fields))})")
    geo = read_geometry(md, src)
    validate_k_transform(kt, geo.n_layer, geo.n_head_kv * geo.head_dim_k, geo.architecture)
    clash = [k for k in provenance if k.startswith(K_TRANSFORM_PREFIX)]
    if clash:
        raise PatchError(f"provenance key {clash[0]} is in the transform's own namespace ({K_TRANSFORM_PREFIX}*)")
    return patch_gguf(src, dst, [], provenance, extra=metadata(kt))
