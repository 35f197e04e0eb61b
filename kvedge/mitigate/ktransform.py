"""The K-transform candidate of export: whether it can be considered, the transform the simulation chooses
(kvedge.mitigate.ktransform_sim, on the calibration prompts), and the model file carrying it, checked
against the original through llama.cpp.

The transform lives in GGUF metadata (kvedge.gguf.ktransform): the file's tensors are the original's byte for
byte, a stock llama.cpp loads it and computes what the original computes, and only kvedge's native llama.cpp
applies it, in the attention graph after RoPE (native/README.md). So an export that considers it runs every
measurement on the native build (`kvedge build-native`), the f16 reference included: one library for the
whole comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import __version__
from ..gguf.ktransform import VERIFIED_ARCHS
from ..gguf.model import ModelInfo, inspect_model, sha256_file
from ..io import atomic_write_text, check_space
from ..errors import ExportError

if TYPE_CHECKING:
    from .diagnose import TorchSide
    from .export import ExportSpec

Log = Callable[[str], None]
MODES = ("auto", "only", "off")  # --transform; only: the one candidate, the best recipe even if not predicted to help


def unavailable(model: ModelInfo) -> str | None:
    """Why the K transform cannot be a candidate for this model on this machine, or None."""
    from ..llama import native

    if model.architecture not in VERIFIED_ARCHS:
        return (f"the native build applies it to the {', '.join(VERIFIED_ARCHS)} architecture only, not "
                f"{model.architecture}")
    if model.k_transform:
        return f"{model.path.name} already carries one"
    lib = native.loaded_library()
    if lib is not None and lib.kind != "native":
        return "this process already runs the stock llama.cpp (run kvedge in a new process)"
    if lib is None and native.find_build() is None:
        return f"kvedge's native llama.cpp is not built: run {native.build_hint()}"
    return None


def choice(spec: ExportSpec, torch_: TorchSide, log: Log):
    """The simulation's choice of transform at the requested types (kept in the work folder)."""
    from ..pcr.run import torch_threads
    from .diagnose import cached
    from .ktransform_sim import KTransformChoice, choose_k_transform

    def run() -> dict:
        log("choosing the K transform in simulation (calibration prompts)")
        with torch_threads(spec.options.resolved_threads()):
            return choose_k_transform(torch_.tm, torch_.cal, spec.kv, spec.rotation, log=log,
                                      force=spec.transform == "only").to_dict()

    key = spec.key(step="k-transform", force=spec.transform == "only")
    return KTransformChoice.from_dict(cached(spec.work / "ktransform.json", key, run))


@dataclass(frozen=True)
class Transformed:
    model: Path
    info: dict  # sha256, bytes, self-check

    @property
    def passed(self) -> bool:
        return bool(self.info["self_check"]["passed"])


def build(spec: ExportSpec, torch_: TorchSide, kt_choice, log: Log) -> Transformed:
    """The original model with the chosen transform in its metadata, in the work folder, checked at f16 KV
    against the original through the native llama.cpp (selfcheck.py's rule). A file failing it is deleted."""
    from ..gguf.ktransform import write_with_k_transform
    from .selfcheck import self_check

    folder = spec.work / "k-transform"
    out = folder / f"{spec.model.path.stem}.kvedge-kt.gguf"
    key = spec.key(step="k-transform-file", choice=kt_choice.to_dict())
    stored = folder / "transformed.json"
    if stored.is_file():
        d = json.loads(stored.read_text(encoding="utf-8"))
        if d.get("key") == key and out.is_file() and sha256_file(out) == d["value"]["model_sha256"]:
            return Transformed(out, d["value"])
    folder.mkdir(parents=True, exist_ok=True)
    check_space(folder, spec.model.size_bytes + (1 << 20), "the transformed model", ExportError)
    log(f"writing the model with the K transform ({kt_choice.chosen.label})")
    write_with_k_transform(spec.model.path, out, kt_choice.transform, {
        "kvedge.k_transform_provenance.kvedge_version": __version__,
        "kvedge.k_transform_provenance.recipe": json.dumps({"recipe": kt_choice.chosen.label, "kv": spec.kv.name,
                                                 "rotation": spec.rotation}, separators=(",", ":")),
        "kvedge.k_transform_provenance.source_sha256": spec.model.sha256,
    })
    log("checking the transformed model against the original at f16 KV (native llama.cpp)")
    info_t = inspect_model(out)
    check = self_check(spec.model, spec.adapter, info_t, spec.adapter, torch_.cal, spec.calib_options)
    info = {"model_sha256": info_t.sha256, "model_bytes": info_t.size_bytes, "self_check": check.to_dict(),
            "self_check_summary": check.summary}
    if not check.passed:
        out.unlink(missing_ok=True)
    atomic_write_text(stored, json.dumps({"key": key, "value": info}, indent=1) + "\n")
    return Transformed(out, info)
