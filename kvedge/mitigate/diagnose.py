"""Export's torch-side steps, each kept in the work folder keyed by what it depends on, so a rerun (or an
export of the same thing into another folder) resumes instead of repeating: PCR's diagnosis of the
unmitigated config, and the smoothing the simulation chooses."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import defaults
from ..io import atomic_write_text
from ..results.pcr import PCR_SCHEMA, Diagnosis, PcrResult

if TYPE_CHECKING:
    from .export import ExportSpec

Log = Callable[[str], None]


def cached(path: Path, key: dict, compute: Callable[[], Any]) -> Any:
    """The value stored at `path` for `key`, else `compute()` stored there."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                return stored["value"]
        except (json.JSONDecodeError, KeyError):
            pass
    value = compute()
    atomic_write_text(path, json.dumps({"key": key, "value": value}, indent=1) + "\n")
    return value


class TorchSide:
    """The calibration set and the torch model, loaded once and only when a step needs them."""

    def __init__(self, spec: ExportSpec, log: Log):
        self.spec, self.log = spec, log

    @cached_property
    def cal(self):
        from ..pcr.calibset import build_calibset, select_calib_prompts

        self.log("calibration prompts through llama.cpp")
        return build_calibset(self.spec.model, self.spec.adapter, select_calib_prompts(), self.spec.calib_options)

    @cached_property
    def tm(self):
        from ..gguf.lora import read_adapter
        from ..pcr.torch.gguf_torch import TorchModel

        self.log("loading the GGUF into torch")
        return TorchModel.from_gguf(self.spec.model.path, read_adapter(self.spec.adapter) if self.spec.adapter else None)


def diagnose(spec: ExportSpec, log: Log) -> PcrResult:
    """PCR's report for the unmitigated config at the deployment's rotation (kept in the work folder)."""
    from ..pcr.run import PcrSpec, run_pcr
    from ..report import write_reports

    def run() -> dict:
        log("PCR diagnosis (torch pass over the calibration prompts)")
        rep = run_pcr(PcrSpec(spec.model, spec.adapter, spec.kv, (spec.rotation,), spec.calib_options), log)
        write_reports(rep, spec.work / "pcr", "pcr")
        return rep.to_dict()

    key = spec.key(step="pcr", ctx=defaults.PCR_CTX, schema=PCR_SCHEMA)  # a report of an older schema is recomputed
    return PcrResult.from_dict(cached(spec.work / "pcr" / "key.json", key, run))


def smoothing_choice(spec: ExportSpec, torch_: TorchSide, verdict: Diagnosis, evidence_layers: list[int], log: Log,
                     population: str | None = None):
    from ..pcr.run import torch_threads
    from .simulate import CARRIER_CACHES, SmoothingChoice, choose_smoothing

    caches = CARRIER_CACHES[verdict.carrier]

    def run() -> dict:
        log(f"choosing the smoothing of {'+'.join(c.upper() for c in caches)} in simulation")
        with torch_threads(spec.options.resolved_threads()):
            choice = choose_smoothing(torch_.tm, torch_.cal, spec.kv, spec.rotation, caches, evidence_layers,
                                      force=spec.smooth in ("force", "only"), population=population, log=log)
        return choice.to_dict()

    key = spec.key(step="smoothing", caches=list(caches), layers=evidence_layers,
                   force=spec.smooth in ("force", "only"), population=population)
    return SmoothingChoice.from_dict(cached(spec.work / "smoothing.json", key, run))


