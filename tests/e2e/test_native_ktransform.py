"""The K transform (native/llama-k-transform.patch, kvedge.gguf.ktransform) end to end: a GGUF carrying it in
its metadata, run by the stock wheel (which ignores it) and by kvedge's native build (which applies it after
RoPE), on the default model; malformed metadata and other architectures refused at model load.

Every llama.cpp run happens in a subprocess (`tests/support/ktransform_probe.py`), because llama-cpp-python
loads one library per process. The native build comes from the per-user cache (the `native_build` fixture;
`kvedge build-native cpu` builds it before pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from support.synthetic import HEAD_DIM, N_HEAD_KV, N_LAYER, write_synthetic

from kvedge.errors import ModelFileError
from kvedge.gguf import ktransform as ktm
from kvedge.gguf.ktransform import (
    KTransform,
    read_k_transform,
    validate_k_transform,
    write_with_k_transform,
)
from kvedge.gguf.model import inspect_model
from kvedge.llama import native
from kvedge.mitigate.gguf_patch import patch_gguf

PROBE = Path(__file__).resolve().parents[1] / "support" / "ktransform_probe.py"
NOISE_FACTOR = 2.0  # the transformed file at f16 may differ from the original by up to this times the noise floor

F32, U32, ARR = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.ARRAY


def _probe(out_dir: Path, name: str, model: Path, type_k: str = "f16", type_v: str = "f16", flash: bool = True,
           rotation: bool = True, lib: Path | None = None) -> tuple[np.ndarray | None, dict]:
    env = {k: v for k, v in os.environ.items() if k not in (native.LIB_PATH_ENV, native.LAYER_TYPES_ENV)}
    if lib is not None:
        env[native.LIB_PATH_ENV] = str(lib)
    out = out_dir / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(PROBE), str(out), str(model), type_k, type_v,
                           "fa" if flash else "nofa", "on" if rotation else "off"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr  # a refused model is a clean exit, with the reason in the json
    meta = json.loads(out.with_suffix(".json").read_text())
    if lib is not None:
        assert Path(meta["lib"]).parent == lib.resolve()
    return (np.load(out)["logits"] if out.exists() else None), meta


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    la, lb = _log_softmax(a), _log_softmax(b)
    kld = (np.exp(la) * (la - lb)).sum(-1)
    return {"max_abs": float(np.abs(a - b).max()), "kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ktransform")


@pytest.fixture(scope="module")
def files(work, model_path) -> dict[str, Path]:
    """The default model with two transforms in its metadata. `rand`: mu ~ N(0, 1) per channel (the default
    model's post-RoPE K channel means are about 0.9 in magnitude), scale 2**U(-2, 2); `pow2`: scale only,
    powers of two (exact in f32 and f16 both ways)."""
    info = inspect_model(model_path)
    assert (info.architecture, info.n_layer, info.n_head, info.n_head_kv, info.head_dim_k) == ("llama", 30, 9, 3, 64)
    rng = np.random.default_rng(22)
    shape = (info.n_layer, info.n_embd_k_gqa)
    transforms = {
        "rand": KTransform(mu=rng.normal(size=shape).astype(np.float32),
                           scale=np.exp2(rng.uniform(-2, 2, size=shape)).astype(np.float32)),
        "pow2": KTransform(mu=None, scale=np.exp2(rng.integers(-2, 3, size=shape)).astype(np.float32)),
    }
    out = {"orig": model_path}
    for name, kt in transforms.items():
        out[name] = work / f"{name}.gguf"
        write_with_k_transform(model_path, out[name], kt, {"kvedge.k_transform_provenance.test": name})
        back = read_k_transform(out[name])
        assert back is not None and (back.mu is None) == (kt.mu is None)
    return out


@pytest.fixture(scope="module")
def native_f16(native_build, files, work) -> dict:
    """The native build at f16 KV: the original (flash attention on and off: the noise floor) and the
    transformed files."""
    lib = native_build.lib_dir
    runs = {name: _probe(work, f"native-{name}-f16", files[name], lib=lib) for name in ("orig", "rand", "pow2")}
    runs["orig-nofa"] = _probe(work, "native-orig-f16-nofa", files["orig"], flash=False, lib=lib)
    runs["rand-nofa"] = _probe(work, "native-rand-f16-nofa", files["rand"], flash=False, lib=lib)
    return runs


def test_the_stock_wheel_ignores_the_metadata(files, work):
    """Metadata, not tensors: the stock llama.cpp loads the transformed file and computes exactly what the
    original computes, at f16 and at q4_0."""
    for t in ("f16", "q4_0"):
        orig, _ = _probe(work, f"stock-orig-{t}", files["orig"], t, t)
        rand, meta = _probe(work, f"stock-rand-{t}", files["rand"], t, t)
        assert orig.shape[0] > 30
        np.testing.assert_array_equal(rand, orig)
        assert "kvedge K transform" not in meta["log"] and meta["can_shift"]


def test_native_f16_agrees_with_the_original_within_the_noise_floor(native_f16):
    """At f16 KV the transform is exact up to f16 rounding: the transformed file's logits differ from the
    original's (mean KLD over the positions, largest |logit difference|) by no more than NOISE_FACTOR times
    what switching flash attention off does, with flash attention on and off; with power-of-two scales and no
    mu every product is the same, bit for bit."""
    orig, o_meta = native_f16["orig"]
    noise = _compare(orig, native_f16["orig-nofa"][0])
    rand, r_meta = native_f16["rand"]
    for label, got in (("flash attention", _compare(orig, rand)),
                       ("no flash attention", _compare(native_f16["orig-nofa"][0], native_f16["rand-nofa"][0]))):
        print(f"f16 noise floor (flash attention on vs off): {noise}; random transform, {label}: {got}")
        assert 0 < noise["kld_mean"] and got["kld_mean"] <= NOISE_FACTOR * noise["kld_mean"], (label, got, noise)
        assert got["max_abs"] <= NOISE_FACTOR * noise["max_abs"], (label, got, noise)
        assert got["top1"] >= 0.9, (label, got)  # a near-tie may flip, as it does between the two noise runs
    np.testing.assert_array_equal(native_f16["pow2"][0], orig)
    # the load log says what applies; the cache refuses K-shift with the transform only
    assert "kvedge K transform: mu on 30 layers, scale on 30 layers" in r_meta["log"]
    assert "kvedge K transform: mu on 0 layers, scale on 30 layers" in native_f16["pow2"][1]["log"]
    assert "kvedge K transform" not in o_meta["log"]
    assert o_meta["can_shift"] and not r_meta["can_shift"] and not native_f16["pow2"][1]["can_shift"]


@pytest.mark.parametrize("rotation", [True, False])
def test_the_transform_acts_on_a_quantized_cache(native_build, files, work, native_f16, rotation):
    """At q4_0 the cache quantizes the transformed rows: the logits differ from the untransformed cache's,
    with llama.cpp's Hadamard rotation on and off (LLAMA_ATTN_ROT_DISABLE=1)."""
    r = "on" if rotation else "off"
    lib = native_build.lib_dir
    orig, o_meta = _probe(work, f"native-orig-q4-{r}", files["orig"], "q4_0", "q4_0", rotation=rotation, lib=lib)
    rand, meta = _probe(work, f"native-rand-q4-{r}", files["rand"], "q4_0", "q4_0", rotation=rotation, lib=lib)
    assert f"attn_rot_k = {int(rotation)}" in meta["log"] and f"attn_rot_k = {int(rotation)}" in o_meta["log"]
    diff = _compare(orig, rand)
    f16 = native_f16["orig"][0]
    print(f"q4_0 rot={r}: transformed vs not {diff}; vs f16: untransformed {_compare(f16, orig)}, "
          f"transformed {_compare(f16, rand)}")
    assert not np.array_equal(orig, rand) and diff["kld_mean"] > 0


def _synthetic_with(work: Path, name: str, arch: str, extra: dict) -> Path:
    src = work / f"synthetic-{arch}.gguf"
    if not src.exists():
        write_synthetic(src, arch)
    dst = work / f"{name}.gguf"
    patch_gguf(src, dst, [], {}, extra=extra)
    return dst


ROW = N_HEAD_KV * HEAD_DIM  # the synthetic models' K row
GOOD_MU = ([0.25] * (N_LAYER * ROW), ARR, F32)
GOOD_SCALE = ([2.0] * (N_LAYER * ROW), ARR, F32)
V1 = (1, U32, None)


@pytest.mark.parametrize("name, extra, native_says, kvedge_says", [
    ("wrong-length", {ktm.KEY_VERSION: V1, ktm.KEY_MU: ([0.25] * (N_LAYER * ROW - 1), ARR, F32)},
     f"kvedge.k_transform.mu has {N_LAYER * ROW - 1} values, expected {N_LAYER * ROW}",
     f"has {N_LAYER * ROW - 1} values, expected {N_LAYER * ROW}"),
    ("nan-mu", {ktm.KEY_VERSION: V1, ktm.KEY_MU: ([0.25] * 70 + [float("nan")] + [0.25] * (N_LAYER * ROW - 71), ARR, F32)},
     "kvedge.k_transform.mu[70] (layer 1) is not finite", r"mu\[70\] \(layer 1, channel 6\) is nan"),
    ("zero-scale", {ktm.KEY_VERSION: V1, ktm.KEY_SCALE: ([2.0] * 5 + [0.0] + [2.0] * (N_LAYER * ROW - 6), ARR, F32)},
     "kvedge.k_transform.scale[5] (layer 0) is 0: every scale must be finite and > 0",
     r"scale\[5\] \(layer 0, channel 5\) is 0: every scale must be finite and > 0"),
    ("version-2", {ktm.KEY_VERSION: (2, U32, None), ktm.KEY_MU: GOOD_MU},
     "kvedge.k_transform.version is 2: this build reads version 1 only", "version is 2: kvedge reads version 1 only"),
    ("no-version", {ktm.KEY_SCALE: GOOD_SCALE}, "kvedge.k_transform.version is missing", "version is missing"),
])
def test_bad_metadata_fails_model_load(native_build, work, name, extra, native_says, kvedge_says):
    """Each rule, on a tiny llama: the native build refuses the model at load, with the reason on one line of
    its log and no crash (llama-cpp-python raises, the probe exits cleanly); kvedge says the same first."""
    path = _synthetic_with(work, name, "llama", extra)
    logits, meta = _probe(work, f"bad-{name}", path, lib=native_build.lib_dir)
    assert logits is None and "error" in meta, meta
    lines = [line for line in meta["log"].splitlines() if "error loading model" in line]
    assert len(lines) == 1 and native_says in lines[0], meta["log"][-2000:]
    with pytest.raises(ModelFileError, match=kvedge_says) as e:
        read_k_transform(path)
    assert "\n" not in str(e.value)


def test_a_valid_transform_on_the_tiny_llama_loads(native_build, work):
    path = _synthetic_with(work, "good", "llama", {ktm.KEY_VERSION: V1, ktm.KEY_MU: GOOD_MU, ktm.KEY_SCALE: GOOD_SCALE})
    logits, meta = _probe(work, "good", path, lib=native_build.lib_dir)
    assert logits is not None and "kvedge K transform: mu on 2 layers, scale on 2 layers" in meta["log"]
    assert read_k_transform(path).mu.shape == (N_LAYER, ROW)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_other_architectures_are_refused(native_build, work, arch):
    """The transform is applied (and verified) in the llama architecture's attention only: a file of another
    architecture carrying it is refused by the native build and by kvedge, not silently run untransformed;
    the stock wheel still runs it (it ignores the keys)."""
    extra = {ktm.KEY_VERSION: V1, ktm.KEY_MU: GOOD_MU, ktm.KEY_SCALE: GOOD_SCALE}
    path = _synthetic_with(work, f"{arch}-kt", arch, extra)
    message = f"kvedge.k_transform is verified for the llama architecture only, not {arch}"
    logits, meta = _probe(work, f"{arch}-native", path, lib=native_build.lib_dir)
    assert logits is None and message in meta["log"], meta["log"][-2000:]
    with pytest.raises(ModelFileError, match=message):
        read_k_transform(path)
    with pytest.raises(ModelFileError, match=message):
        validate_k_transform(KTransform(mu=np.zeros((N_LAYER, ROW), np.float32), scale=None), N_LAYER, ROW, arch)
    logits, meta = _probe(work, f"{arch}-stock", path)
    assert logits is not None and "error" not in meta


def test_the_build_applies_both_patches_and_is_keyed_on_them(native_build):
    """build.sh applies the per-layer types patch, then the K transform's; the cache key and the manifest's
    hashes are the ones kvedge.llama.native computes; --server adds the server's targets to the same flags."""
    m = native_build.manifest
    assert [p["name"] for p in m["patches"]] == list(native.PATCH_NAMES) == ["llama-kv-layer-types.patch",
                                                                            "llama-k-transform.patch"]
    assert m["patch_sha256"] == native.patch_sha256() and m["sources_sha256"] == native.sources_sha256()
    assert all((native_build.lib_dir.parent / p["name"]).is_file() for p in m["patches"])
    proc = subprocess.run(["bash", str(native.source_dir() / "build.sh"), "cpu", "--dry-run", "--server"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    patches = [line.split()[1] for line in lines if line.startswith("patch: ")]
    assert [Path(p).name for p in patches] == list(native.PATCH_NAMES)
    info = dict(line.split(": ", 1) for line in lines)
    assert info["patches"] == f"sha256 {native.patch_sha256()}" and info["dest"] == str(native.build_root() / "cpu")
    assert info["server cmake"].startswith(info["cmake"] + " ") and "-DLLAMA_BUILD_SERVER=ON" in info["server cmake"]
