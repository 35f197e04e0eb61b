"""The smoothed model and adapter export builds when the simulation chose a smoothing: written next to the
work folder's other steps with gguf-py, checked against the original through llama.cpp (selfcheck.py),
kept when the check passes and deleted when it fails."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import __version__
from ..gguf.model import inspect_model, sha256_file
from ..io import atomic_write_text

if TYPE_CHECKING:
    from .diagnose import TorchSide
    from .export import ExportSpec

Log = Callable[[str], None]


@dataclass(frozen=True)
class Patched:
    model: Path
    adapter: Path | None
    info: dict  # patch reports, self-check, file hashes

    @property
    def passed(self) -> bool:
        return bool(self.info["self_check"]["passed"])


def build_patched(spec: ExportSpec, torch_: TorchSide, choice, log: Log) -> Patched:
    """The smoothed model (and adapter) in the work folder, checked against the original through
    llama.cpp. Kept when the check passes; a failing pair is deleted."""
    import gguf

    from .gguf_patch import patch_gguf
    from .selfcheck import self_check
    from .simulate import geometry
    from .smooth import adapter_scales, tensor_scales

    folder = spec.work / "smoothed"
    model_out = folder / f"{spec.model.path.stem}.kvedge.gguf"
    adapter_out = folder / f"{spec.adapter.stem}.kvedge.gguf" if spec.adapter else None
    sm = choice.smoothing
    key = spec.key(step="patch", exponents=sm.to_json())
    stored = folder / "patched.json"
    if stored.is_file():
        d = json.loads(stored.read_text(encoding="utf-8"))
        intact = model_out.is_file() and sha256_file(model_out) == d["value"]["model_sha256"] and (
            adapter_out is None or (adapter_out.is_file() and sha256_file(adapter_out) == d["value"]["adapter_sha256"]))
        if d.get("key") == key and intact:
            return Patched(model_out, adapter_out, d["value"])

    recipe = choice.chosen
    provenance = {
        "kvedge.smoothing.version": __version__,
        "kvedge.smoothing.recipe": json.dumps({"caches": list(recipe.caches), "alpha": recipe.alpha,
                                               "layers": list(recipe.layers), "kv": spec.kv.name,
                                               "rotation": spec.rotation}, separators=(",", ":")),
        "kvedge.smoothing.exponents": sm.to_json(),
        "kvedge.smoothing.how": "the KV cache stores x / 2^e per channel (e above, per layer and cache); "
                                "Q rows or attn_output columns carry 2^e: see kvedge docs/methodology/mitigation.md",
    }
    log(f"writing the smoothed model ({recipe.label})")
    present = {t.name for t in gguf.GGUFReader(spec.model.path, "r").tensors}
    scales = tensor_scales(sm, geometry(torch_.tm), present)
    rep_model = patch_gguf(spec.model.path, model_out, scales,
                           provenance | {"kvedge.smoothing.source_sha256": spec.model.sha256})
    rep_adapter = None
    if spec.adapter:
        a_present = {t.name for t in gguf.GGUFReader(spec.adapter, "r").tensors}
        rep_adapter = patch_gguf(spec.adapter, adapter_out, adapter_scales(scales, a_present),
                                 provenance | {"kvedge.smoothing.source_sha256": spec.adapter_sha or ""})
    log("checking the smoothed model against the original at f16 KV (llama.cpp)")
    patched_info = inspect_model(model_out)
    check = self_check(spec.model, spec.adapter, patched_info, adapter_out, torch_.cal, spec.calib_options)
    info = {"model_sha256": patched_info.sha256, "model_bytes": patched_info.size_bytes,
            "adapter_sha256": sha256_file(adapter_out) if adapter_out else None,
            "patch": {"model": rep_model.to_dict(), "adapter": rep_adapter.to_dict() if rep_adapter else None},
            "self_check": check.to_dict(), "self_check_summary": check.summary}
    if not check.passed:
        for p in (model_out, adapter_out):
            if p is not None and p.exists():
                p.unlink()
    atomic_write_text(stored, json.dumps({"key": key, "value": info}, indent=1) + "\n")
    return Patched(model_out, adapter_out, info)


