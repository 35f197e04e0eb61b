"""kvedge's native llama.cpp: the llama.cpp that llama-cpp-python 0.3.36 vendors, with two patches applied in
order (PATCH_NAMES): `native/llama-kv-layer-types.patch` gives each layer's K and V cache its own type, and
`native/llama-k-transform.patch` applies the K transform a GGUF may carry in its `kvedge.k_transform.*`
metadata (kvedge.gguf.ktransform).

`native/build.sh` (or `kvedge build-native`) builds it once per user into a cache directory keyed by the
llama-cpp-python version, the hash of the patches and the build script, and the backend. kvedge loads it only
when a per-layer KV config (or a model carrying the K transform) asks for it, through llama-cpp-python's
LLAMA_CPP_LIB_PATH, which llama-cpp-python reads once, when `llama_cpp` is first imported: the whole process
then runs on that library, so an audit holding a per-layer config runs every config, the f16 reference
included, on the native build. A process that has already loaded the stock wheel cannot switch, and a
per-layer config there is refused: the stock library would ignore the layer map and silently run the uniform
cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KvedgeError, NativeUnavailable

LAYER_TYPES_ENV = "LLAMA_KV_LAYER_TYPES"  # read by the patched llama.cpp when a context is created
LIB_PATH_ENV = "LLAMA_CPP_LIB_PATH"  # read by llama-cpp-python when `llama_cpp` is first imported
CACHE_ENV = "KVEDGE_NATIVE_CACHE"
BACKEND_ENV = "KVEDGE_NATIVE_BACKEND"
LLAMA_CPP_PYTHON = "0.3.36"  # the version build.sh patches; the pin in pyproject.toml
BACKENDS = ("cpu", "cuda", "metal")
PREFERENCE = ("cuda", "metal", "cpu")  # which build to load when several exist and none is named
# applied in this order by build.sh (which lists the same names)
PATCH_NAMES = ("llama-kv-layer-types.patch", "llama-k-transform.patch")


def source_dir() -> Path:
    """The patches and build script: `native/` in a checkout, packaged in the kvedge package as `_native`."""
    return Path(__file__).resolve().parent.parent / "_native"


def _patches() -> bytes:
    return b"".join((source_dir() / name).read_bytes() for name in PATCH_NAMES)


def patch_sha256() -> str:
    """The patches, concatenated in order (the manifest's `patch_sha256`; `patches` lists each one's)."""
    return hashlib.sha256(_patches()).hexdigest()


def sources_sha256() -> str:
    """The patches and the build script together (its flags are part of the arithmetic): the cache key."""
    return hashlib.sha256(_patches() + (source_dir() / "build.sh").read_bytes()).hexdigest()


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvedge" / "native"


def build_root() -> Path:
    """Where the builds of this patch, build script and llama-cpp-python version live, one per backend."""
    return cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-{sources_sha256()[:12]}"


def build_hint(backend: str = "cpu") -> str:
    return f"`kvedge build-native {backend}` (or native/build.sh {backend} in a checkout; a few minutes)"


@dataclass(frozen=True)
class NativeBuild:
    backend: str
    lib_dir: Path
    manifest: dict[str, Any]


def _library_file(lib_dir: Path) -> Path | None:
    for name in ("libllama.so", "libllama.dylib"):
        if (lib_dir / name).exists():
            return lib_dir / name
    return None


def _read_build(directory: Path) -> NativeBuild | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    lib_dir = directory / "lib"
    if manifest.get("sources_sha256") != sources_sha256() or _library_file(lib_dir) is None:
        return None
    return NativeBuild(manifest.get("backend", directory.name), lib_dir, manifest)


def builds() -> dict[str, NativeBuild]:
    """The complete builds of this patch, by backend."""
    found = {}
    for backend in BACKENDS:
        b = _read_build(build_root() / backend)
        if b is not None:
            found[backend] = b
    return found


def find_build() -> NativeBuild | None:
    """The build to load: $KVEDGE_NATIVE_BACKEND's, else the first of cuda, metal, cpu that exists."""
    found = builds()
    wanted = os.environ.get(BACKEND_ENV, "").strip().lower()
    if wanted:
        if wanted not in BACKENDS:
            raise NativeUnavailable(f"${BACKEND_ENV} must be one of {', '.join(BACKENDS)}, not {wanted!r}")
        return found.get(wanted)
    return next((found[b] for b in PREFERENCE if b in found), None)


@dataclass(frozen=True)
class Library:
    """The libllama this process loaded: `stock` (llama-cpp-python's wheel) or `native` (with its manifest)."""

    kind: str
    path: str
    manifest: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": self.path}
        if self.manifest:
            m = self.manifest
            out.update({k: m.get(k) for k in ("backend", "llama_cpp_python", "llama_cpp_commit", "patch_sha256",
                                              "sources_sha256", "cmake_args")})
        return out

    @property
    def key(self) -> str:
        """What a store key records of the library: the native build's identity (a stock wheel is the
        llama-cpp-python pin, which the key already holds through kvedge's version)."""
        if self.kind != "native" or not self.manifest:
            return "stock"
        m = self.manifest
        flags = hashlib.sha256(json.dumps(m.get("cmake_args")).encode()).hexdigest()[:8]
        return (f"native {m.get('llama_cpp_commit')} patch {str(m.get('patch_sha256'))[:12]} {m.get('backend')} "
                f"flags {flags}")


def loaded_library() -> Library | None:
    """The libllama llama_cpp loaded in this process, or None before the first `import llama_cpp`."""
    mod = sys.modules.get("llama_cpp.llama_cpp")
    if mod is None:
        return None
    path = Path(mod._lib._name).resolve()
    try:
        manifest = json.loads((path.parent.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest and manifest.get("patch_sha256"):
        return Library("native", str(path), manifest)
    return Library("stock", str(path))


def ggml_libraries() -> list[str] | None:
    """The libggml files mapped into this process (from /proc/self/maps); None where that is not readable."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split(maxsplit=5)[-1] for line in maps.splitlines() if "/libggml" in line}
    return sorted(str(Path(p).resolve()) for p in paths if Path(p).name.startswith("libggml"))


def check_one_ggml() -> None:
    """Two ggml copies in one process (say the wheel's, through llama_cpp._ggml, beside the native build's)
    would leave tensors and backends created by one to be read by the other."""
    libs = ggml_libraries()
    if libs is None:
        return
    dirs = sorted({str(Path(p).parent) for p in libs})
    if len(dirs) > 1:
        raise NativeUnavailable(f"two ggml libraries are loaded in this process ({' and '.join(dirs)}): "
                                "run kvedge in a fresh process")


PER_LAYER = "per-layer KV configs need"  # the subject and verb of the messages below


def _stock_loaded(lib: Library, what: str = PER_LAYER) -> NativeUnavailable:
    return NativeUnavailable(f"{what} kvedge's native llama.cpp, but this process already "
                             f"loaded the stock one ({lib.path}) and llama-cpp-python cannot switch libraries: run it "
                             f"in a new process (the kvedge command does), or set {LIB_PATH_ENV} to the native "
                             "build's lib directory before importing llama_cpp")


def check_available(what: str = PER_LAYER) -> None:
    """The cheap check before any work: NativeUnavailable (exit 2) when this process cannot run the native
    build, because it is not built or because the stock library is already loaded. `what` names what needs
    it with its verb ("... need"), the start of the message."""
    lib = loaded_library()
    if lib is not None:
        if lib.kind != "native":
            raise _stock_loaded(lib, what)
    elif find_build() is None:
        raise NativeUnavailable(f"{what} kvedge's native llama.cpp build, which is not built for "
                                f"this kvedge: run {build_hint()}")


def require_native() -> Library:
    """Make sure this process runs the native build, loading it if llama_cpp is not imported yet."""
    check_available()
    if loaded_library() is None:
        os.environ[LIB_PATH_ENV] = str(find_build().lib_dir)
        import llama_cpp  # noqa: F401  (loads the library named above, for the whole process)
    lib = loaded_library()
    if lib is None or lib.kind != "native":
        raise _stock_loaded(lib or Library("stock", "?"))
    check_one_ggml()
    return lib


def build(backend: str = "cpu", force: bool = False, dry_run: bool = False, jobs: int | None = None,
          server: bool = False) -> int:
    """Run native/build.sh for `backend`, its output going to this process's; returns its exit status.
    `server` also builds llama-server from the same patched tree (build.sh --server: <build>/bin)."""
    if backend not in BACKENDS:
        raise KvedgeError(f"unknown backend {backend!r}: choose {', '.join(BACKENDS)}")
    env = {**os.environ, "KVEDGE_PYTHON": sys.executable}
    if jobs:
        env["KVEDGE_BUILD_JOBS"] = str(jobs)
    args = ["bash", str(source_dir() / "build.sh"), backend] + (["--force"] if force else []) + (
        ["--dry-run"] if dry_run else []) + (["--server"] if server else [])
    return subprocess.run(args, env=env).returncode
