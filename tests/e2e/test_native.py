"""kvedge's native llama.cpp (per-layer KV cache types), end to end on the default model.

The build comes from the per-user cache (the `native_build` fixture finds it; `kvedge build-native cpu`, run
before pytest, builds it).
Every llama.cpp run happens in a subprocess, because llama-cpp-python loads one library per process:
`tests/support/native_probe.py` drives llama.cpp directly, so the library is what is tested, and the kvedge CLI
runs the audit as a user would.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from support.cli import run_cli
from kvedge.gguf import kvtypes
from kvedge.llama import native
from kvedge.gguf.kvmap import parse_kv
from kvedge.gguf.model import inspect_model

PROBE = Path(__file__).resolve().parents[1] / "support" / "native_probe.py"
MAP = "k=11:q8_0,17:q8_0,19:q8_0"  # what kvedge sets for k=q4_0@11+17+19:q8_0/v=q4_0


def _probe(tmp_path: Path, name: str, type_k: str, type_v: str, layer_types: str | None = None,
           rotation: str = "on", lib: Path | None = None) -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if k not in (native.LIB_PATH_ENV, native.LAYER_TYPES_ENV)}
    if lib is not None:
        env[native.LIB_PATH_ENV] = str(lib)
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(PROBE), str(out), type_k, type_v, layer_types or "-", rotation],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    arrays = dict(np.load(out)) if out.exists() else {}
    return arrays, meta


def kv_state(buf: bytes) -> list[dict]:
    """llama.cpp's serialised state of one sequence (llama_state_seq_get_data, unified cache, no cell
    extension): per layer, the K and V types, row sizes and rows as llama.cpp wrote them."""
    magic, _seq, n_stream = struct.unpack_from("<IiI", buf, 0)
    assert magic == 0xAF143CD8 and n_stream == 1
    off = 12
    (cells,) = struct.unpack_from("<I", buf, off)
    off += 4
    for _ in range(cells):
        _pos, n_seq = struct.unpack_from("<iI", buf, off)
        off += 8 + 4 * n_seq
    v_trans, n_layer = struct.unpack_from("<II", buf, off)
    off += 8
    assert v_trans == 0  # flash attention: V stored by rows, as K
    layers = [{} for _ in range(n_layer)]
    for kind in ("k", "v"):
        for layer in layers:
            t, row = struct.unpack_from("<iQ", buf, off)
            off += 12
            layer[f"{kind}_type"], layer[f"{kind}_row"] = t, row
            layer[kind] = buf[off:off + row * cells]
            off += row * cells
    assert off == len(buf)
    return layers


def _type_name(t: int) -> str:
    return kvtypes.GGMLQuantizationType(t).name.lower()


def test_uniform_cache_is_bit_identical_to_the_stock_wheel(native_build, tmp_path):
    """Same flags, same arithmetic: the patch leaves a one-type cache's computation untouched."""
    for tk, tv, rot in (("q4_0", "q4_0", "on"), ("q4_0", "q4_0", "off"), ("f16", "f16", "on"), ("q8_0", "q4_0", "on")):
        stock, s_meta = _probe(tmp_path, f"stock-{tk}-{tv}-{rot}", tk, tv, rotation=rot)
        nat, n_meta = _probe(tmp_path, f"native-{tk}-{tv}-{rot}", tk, tv, rotation=rot, lib=native_build.lib_dir)
        assert Path(n_meta["lib"]).parent == native_build.lib_dir.resolve() and s_meta["lib"] != n_meta["lib"]
        assert stock["logits"].shape[0] > 20
        np.testing.assert_array_equal(nat["logits"], stock["logits"])
        assert bytes(nat["state"]) == bytes(stock["state"])


def test_every_layer_overridden_computes_the_uniform_cache(native_build, tmp_path):
    """A q4_0 context whose map sets every layer's K to q8_0 is the stock k=q8_0/v=q4_0 context, bit for bit,
    with and without rotation: the per-layer path computes what the uniform path computes."""
    for rot in ("on", "off"):
        stock, _ = _probe(tmp_path, f"stock-q8-{rot}", "q8_0", "q4_0", rotation=rot)
        nat, _ = _probe(tmp_path, f"native-all-{rot}", "q4_0", "q4_0", "k=*:q8_0", rotation=rot,
                        lib=native_build.lib_dir)
        np.testing.assert_array_equal(nat["logits"], stock["logits"])
        assert bytes(nat["state"]) == bytes(stock["state"])


def test_a_map_is_honoured_per_layer(native_build, tmp_path, model_path):
    """Layers 11, 17, 19 at q8_0 in a q4_0 cache: llama.cpp's own state holds those types and row sizes, its
    bytes per token are kvedge's figure, its load log says so, and the logits are neither uniform cache's."""
    model = inspect_model(model_path)
    config = parse_kv("k=q4_0@11+17+19:q8_0/v=q4_0").resolve(model)
    assert config.layer_types_env() == MAP
    nat, meta = _probe(tmp_path, "map", "q4_0", "q4_0", MAP, rotation="off", lib=native_build.lib_dir)
    q4, _ = _probe(tmp_path, "q4", "q4_0", "q4_0", rotation="off", lib=native_build.lib_dir)
    q8k, _ = _probe(tmp_path, "q8k", "q8_0", "q4_0", rotation="off", lib=native_build.lib_dir)
    layers = kv_state(bytes(nat["state"]))
    assert [_type_name(x["k_type"]) for x in layers] == list(config.types("k", model.n_layer))
    assert [_type_name(x["v_type"]) for x in layers] == ["q4_0"] * model.n_layer
    assert sum(x["k_row"] + x["v_row"] for x in layers) == config.bytes_per_token(model)
    uniform = kv_state(bytes(q4["state"]))
    assert sum(x["k_row"] + x["v_row"] for x in uniform) == parse_kv("q4_0").bytes_per_token(model)
    # the serialised state grows by exactly the extra row bytes for each cached token
    extra = len(bytes(nat["state"])) - len(bytes(q4["state"]))
    assert extra == int(meta["n_tokens"]) * (config.bytes_per_token(model) - parse_kv("q4_0").bytes_per_token(model))
    log = meta["log"]
    assert re.search(r"K \(q4_0 x27, q8_0 x3\): +[\d.]+ MiB, V \(q4_0\)", log), log
    for l in range(model.n_layer):
        t = "q8_0" if l in (11, 17, 19) else "q4_0"
        assert re.search(rf"layer +{l}: K {t}, V q4_0", log)
    assert not np.array_equal(nat["logits"], q4["logits"]) and not np.array_equal(nat["logits"], q8k["logits"])
    # state save/load: the same map takes the saved sequence back and continues bit for bit; a cache
    # whose layers hold other types refuses it
    assert meta["state_loaded"] and meta["roundtrip_equal"]
    assert meta["uniform_context_accepts_state"] is False


def test_rotation_applies_to_the_quantized_layers_only(native_build, tmp_path):
    """An f16 cache with only the last layer at q4_0: layers 0-28 store exactly the stock f16 cache's rows
    (not rotated: an f16 layer computes what it computes in an f16 cache), layer 29 is quantized and rotated
    (its rows differ with LLAMA_ATTN_ROT_DISABLE=1)."""
    lt = "k=29:q4_0;v=29:q4_0"
    f16, _ = _probe(tmp_path, "f16", "f16", "f16")
    on, meta = _probe(tmp_path, "last-on", "f16", "f16", lt, "on", lib=native_build.lib_dir)
    off, _ = _probe(tmp_path, "last-off", "f16", "f16", lt, "off", lib=native_build.lib_dir)
    ref, s_on, s_off = (kv_state(bytes(x["state"])) for x in (f16, on, off))
    for l in range(29):
        for kind in ("k", "v"):
            assert s_on[l][kind] == ref[l][kind] == s_off[l][kind], (l, kind)
    assert _type_name(s_on[29]["k_type"]) == "q4_0" and s_on[29]["k"] != s_off[29]["k"]
    assert s_on[29]["v"] != s_off[29]["v"]
    assert "attn_rot_k = 1" in meta["log"] and "attn_rot_v = 1" in meta["log"]


def test_one_ggml_serves_the_process(native_build, tmp_path):
    _, meta = _probe(tmp_path, "ggml", "q4_0", "q4_0", MAP, lib=native_build.lib_dir)
    assert meta["ggml"] and all(Path(p).parent == native_build.lib_dir.resolve() for p in meta["ggml"]), meta["ggml"]
    # kvedge refuses a process where a second ggml came in (llama-cpp-python's _ggml loads the wheel's)
    code = ("from kvedge.llama import native; native.require_native(); import llama_cpp._ggml\n"
            "try:\n    native.check_one_ggml()\nexcept native.NativeUnavailable as e:\n    print('refused:', e)")
    env = {k: v for k, v in os.environ.items() if k != native.LIB_PATH_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: two ggml libraries are loaded" in proc.stdout


def test_audit_with_a_layer_map_end_to_end(native_build, tmp_path, model_path):
    out = tmp_path / "audit"
    proc = run_cli("audit", "--kv", "q4_0,k=q4_0@19+17+11:q8_0/v=q4_0", "--rotation", "off",
                   "--benchmarks", "advbench,harmbench,xstest", "--limit", "1", "--max-tokens", "12", "--ctx", "512", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "report.json").read_text())
    labels = [r["label"] for r in rep["runs"]]
    assert labels == ["f16", "f16 noise (flash-attn-off)", "q4_0 rot=off", "k=q4_0@11+17+19:q8_0/v=q4_0 rot=off"]
    lib = rep["backend"]["library"]
    assert lib["kind"] == "native" and lib["patch_sha256"] == native.patch_sha256()
    model = inspect_model(model_path)
    mp = rep["runs"][3]
    assert mp["layers_k"] == [[11, "q8_0"], [17, "q8_0"], [19, "q8_0"]] and "layers_v" not in mp
    assert mp["memory"]["bytes_per_token"] == parse_kv(mp["label"].split()[0]).resolve(model).bytes_per_token(model)
    assert mp["memory"]["bytes_per_token"] > rep["runs"][2]["memory"]["bytes_per_token"]
    assert mp["speed"]["generations"] == 4 and mp["vs_noise"]["verdict"]
    # every run, the f16 reference too, ran on the native build, and the store key says so
    import sqlite3

    with sqlite3.connect(out / "kvedge.sqlite") as c:
        specs = [json.loads(s) for (s,) in c.execute("SELECT spec_json FROM runs")]
    assert len(specs) == 4 and all(s["library"] == lib["key"] for s in specs)
    assert next(s for s in specs if s["label"] == mp["label"])["layers_k"] == mp["layers_k"]
    md = (out / "report.md").read_text()
    assert "| k=q4_0@11+17+19:q8_0/v=q4_0 rot=off |" in md and "kvedge's native build (llama.cpp 0c1e57098" in md


def _cmake_options(native_build) -> set[str]:
    """Every option() the vendored llama.cpp's CMake files declare, read from the cached sdist."""
    sdist = native.cache_root() / "sdist" / f"llama_cpp_python-{native.LLAMA_CPP_PYTHON}.tar.gz"
    names: set[str] = set()
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.name.endswith(("CMakeLists.txt", ".cmake")) and "/vendor/llama.cpp/" in m.name:
                text = tar.extractfile(m).read().decode("utf-8", "replace")
                names |= set(re.findall(r"option\(\s*([A-Z0-9_]+)", text))
    return names


@pytest.mark.parametrize("backend, wanted", [
    ("cpu", []), ("cuda", ["-DGGML_CUDA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=ON"]),
    ("metal", ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]),
])
def test_build_flags_per_backend(native_build, backend, wanted):
    """What Linux allows for CUDA and Metal: the script composes each backend's flags, the user's CMAKE_ARGS
    after them, and every llama.cpp/ggml option it sets is one the vendored CMake declares."""
    env = {**os.environ, "CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90"}
    proc = subprocess.run(["bash", str(native.source_dir() / "build.sh"), backend, "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    flags = lines["cmake"].split()
    assert lines["dest"] == str(native.build_root() / backend)
    assert "-DCMAKE_BUILD_TYPE=Release" in flags and "-DBUILD_SHARED_LIBS=ON" in flags
    assert all(f in flags for f in wanted) and flags[-1] == "-DCMAKE_CUDA_ARCHITECTURES=90"
    assert not any(f.startswith("-DGGML_") for f in flags if f not in wanted)  # GGML_NATIVE stays at its default
    declared = _cmake_options(native_build)
    for f in flags:
        name = f[2:].split("=")[0] if f.startswith("-D") else None
        if name and name.startswith(("GGML_", "LLAMA_")):
            assert name in declared, f"{name} is not an option of the vendored llama.cpp"


def test_a_stock_process_refuses_a_per_layer_runtime(model_path):
    import llama_cpp  # noqa: F401  (this test process runs the stock wheel)

    from kvedge.gguf.model import inspect_model
    from kvedge.llama.runtime import Runtime

    assert native.loaded_library().kind == "stock"
    model = inspect_model(model_path)
    with pytest.raises(native.NativeUnavailable, match="already loaded the stock one"):
        Runtime(model, parse_kv("k=q4_0@19:q8_0/v=q4_0").resolve(model))
