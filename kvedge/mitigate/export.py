"""`kvedge export`: diagnose, build the mitigation the diagnosis calls for, measure the candidates on the
calib split through llama.cpp, choose, and write the deployment folder.

Every step that costs minutes is kept in the work folder (PCR report, the simulation's choice, the
patched files with their self-check, the audit stores), keyed by what it depends on, so a rerun (or an
export of the same thing into another folder) resumes instead of repeating. The deployment folder gets
files only when everything succeeded: they are staged in a hidden folder inside it and renamed into place,
deploy.json last; on any failure the stage is removed and nothing is kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from .. import __version__, defaults
from ..errors import ExportError
from ..gguf.model import ModelInfo, inspect_model, sha256_file
from ..io import atomic_write_text, check_new_folder, write_folder
from ..llama.runtime import F16, KVConfig, RuntimeOptions
from ..results.pcr import PCR_SCHEMA, Diagnosis, Fidelity, PcrResult, RotationResult
from . import candidates as cands
from .choose import (
    NOISE,
    Measured,
    Target,
    measure,
    report_verdicts,
    run_entry,
    runner_up,
)
from .deploy import (
    SCHEMA,
    Deployment,
    FileRef,
    Launch,
    ollama_support,
    render_all,
    rotation_requirement,
)

Log = Callable[[str], None]
PCR_CTX = defaults.PCR_CTX


@dataclass(frozen=True)
class ExportSpec:
    model: ModelInfo
    adapter: Path | None
    kv: KVConfig  # the unmitigated configuration the user wants to run
    rotation: bool
    target: Target
    out: Path
    work: Path
    limit: int | None = None
    max_tokens: int = 64
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    smooth: str = "auto"  # auto | force | off

    @property
    def adapter_sha(self) -> str | None:
        return sha256_file(self.adapter) if self.adapter else None

    @property
    def calib_options(self) -> RuntimeOptions:
        """How llama.cpp runs the PCR calibration prompts (the smoothing's statistics and self-check too)."""
        return RuntimeOptions(n_ctx=PCR_CTX, n_threads=self.options.n_threads)

    def key(self, **extra: Any) -> dict:
        return {"kvedge_version": __version__, "model_sha256": self.model.sha256, "adapter_sha256": self.adapter_sha,
                "kv": self.kv.name, "rotation": self.rotation, **extra}


@dataclass(frozen=True)
class ExportResult:
    deploy: dict[str, Any]
    out: Path
    files: tuple[Path, ...]


def _cached(path: Path, key: dict, compute: Callable[[], Any]) -> Any:
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


class _Torch:
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

    key = spec.key(step="pcr", ctx=PCR_CTX, schema=PCR_SCHEMA)  # a report of an older schema is recomputed
    return PcrResult.from_dict(_cached(spec.work / "pcr" / "key.json", key, run))


def smoothing_choice(spec: ExportSpec, torch_: _Torch, verdict: Diagnosis, evidence_layers: list[int], log: Log,
                     population: str | None = None):
    from ..pcr.run import torch_threads
    from .simulate import CARRIER_CACHES, SmoothingChoice, choose_smoothing

    caches = CARRIER_CACHES[verdict.carrier]

    def run() -> dict:
        log(f"choosing the smoothing of {'+'.join(c.upper() for c in caches)} in simulation")
        with torch_threads(spec.options.resolved_threads()):
            choice = choose_smoothing(torch_.tm, torch_.cal, spec.kv, spec.rotation, caches, evidence_layers,
                                      force=spec.smooth == "force", population=population, log=log)
        return choice.to_dict()

    key = spec.key(step="smoothing", caches=list(caches), layers=evidence_layers, force=spec.smooth == "force",
                   population=population)
    return SmoothingChoice.from_dict(_cached(spec.work / "smoothing.json", key, run))


@dataclass(frozen=True)
class Patched:
    model: Path
    adapter: Path | None
    info: dict  # patch reports, self-check, file hashes

    @property
    def passed(self) -> bool:
        return bool(self.info["self_check"]["passed"])


def build_patched(spec: ExportSpec, torch_: _Torch, choice, log: Log) -> Patched:
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
                                "Q rows or attn_output columns carry 2^e: see kvedge docs/mitigation.md",
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


class CalibBench:
    """Measures candidates on the calib split through `kvedge.api.audit`: the original model's f16
    reference and noise run once, each candidate against them. The audit stores live in the work folder."""

    def __init__(self, spec: ExportSpec, progress: bool):
        self.spec, self.progress = spec, progress
        self.orig_dir, self.smooth_dir = spec.work / "calib", spec.work / "calib-smoothed"
        self.measured: dict[cands.Candidate, tuple[Measured, dict]] = {}
        self.reports: dict[str, dict] = {}

    def _audit(self, model: Path, adapter: Path | None, kvs: list[KVConfig], noise: str | None, out: Path) -> dict:
        from ..api import audit

        s = self.spec
        return audit(model=model, lora=adapter, kv=",".join(k.name for k in kvs), rotation="on" if s.rotation else "off",
                     split="calib", limit=s.limit, max_tokens=s.max_tokens, ctx=s.options.n_ctx,
                     threads=s.options.n_threads, noise=noise, out=out, progress=self.progress, canary=False).report

    def measure(self, c: cands.Candidate, patched: Patched | None = None) -> Measured:
        if c in self.measured:
            return self.measured[c][0]
        s = self.spec
        orig = self._audit(s.model.path, s.adapter, [s.kv] if c.smoothed else [c.kv], NOISE, self.orig_dir)
        self.reports["original"] = orig
        harmful = {p["id"]: p["harmful"] for p in orig["prompts"]}
        ref = report_verdicts(orig, "f16")
        noise = report_verdicts(orig, orig["noise_floor"]["label"])
        if c.smoothed:
            rep = self._audit(patched.model, patched.adapter, [c.kv], None, self.smooth_dir)
            self.reports["smoothed"] = rep
        else:
            rep = orig
        entry = run_entry(rep, c.kv, c.rotation)
        m = measure(c.label, harmful, ref, noise, report_verdicts(rep, entry["label"]))
        self.measured[c] = (m, {"audit": "smoothed" if c.smoothed else "original", "store_key": entry["key"],
                                "report_label": entry["label"], "kld": entry["kld"], "ppl_ratio": entry["ppl_ratio"]})
        return m

    def final_reports(self) -> dict[str, dict]:
        """The original model's audit over every measured config (from the store: no new generation)."""
        kvs = [c.kv for c in self.measured if not c.smoothed]
        s = self.spec
        self.reports["original"] = self._audit(s.model.path, s.adapter, kvs, NOISE, self.orig_dir)
        return self.reports


def _file_ref(path: Path, sha: str, size: int) -> FileRef:
    return FileRef(str(path.resolve()), sha, size)


@dataclass
class Decision:
    """What the candidates loop found: the order, what was chosen (None: nothing met the target), the
    runner-up, PCR's prescription, and why a candidate was skipped."""

    order: list[cands.Candidate]
    unmitigated: cands.Candidate
    prescription: cands.Candidate
    chosen: cands.Candidate | None = None
    runner_up: cands.Candidate | None = None
    skipped: dict[cands.Candidate, str] = field(default_factory=dict)

    @property
    def final(self) -> cands.Candidate:
        return self.chosen or cands.Candidate("kv", F16, self.unmitigated.rotation)


def run_export(spec: ExportSpec, log: Log, progress: bool = True) -> ExportResult:
    pcr = diagnose(spec, log)
    rot_entry = pcr.rotations[0]
    verdict = rot_entry.verdict
    evidence_layers = list(verdict.suggested.get("smooth_layers") or rot_entry.concentration.top3_layers)
    log(f"PCR: {verdict.mode} (carrier {verdict.carrier}), layers {evidence_layers}")

    torch_ = _Torch(spec, log)
    choice = None
    if spec.smooth == "force" or (spec.smooth == "auto" and verdict.mode == "outlier-crushes-safety"):
        choice = smoothing_choice(spec, torch_, verdict, evidence_layers, log, rot_entry.evidence.population)
        log(f"smoothing: {choice.reason}")
    smoothed = choice is not None and choice.chosen is not None
    prescription = cands.prescription(verdict.to_dict(), spec.kv, spec.rotation, smoothed)
    decision = Decision(cands.candidates(spec.model, spec.kv, spec.rotation, verdict.carrier, prescription, smoothed,
                                         verdict.to_dict()), cands.Candidate("kv", spec.kv, spec.rotation), prescription)
    bench = CalibBench(spec, progress)
    log(f"calib split: f16 reference, noise run and the unmitigated {decision.unmitigated.label}")
    bench.measure(decision.unmitigated)
    patched: Patched | None = None
    for c in decision.order:
        if c.smoothed:
            patched = build_patched(spec, torch_, choice, log)
            if not patched.passed:
                decision.skipped[c] = "the smoothed model failed its self-check: " + patched.info["self_check_summary"]
                log(decision.skipped[c])
                continue
        if c.kind == "per-layer":
            cands.measure_per_layer(c)
        log(f"calib split: measuring {c.label}")
        m = bench.measure(c, patched)
        met = spec.target.met(m)
        log(f"  flips -{m.harmful.lost}/+{m.harmful.gained} harmful, -{m.benign.lost}/+{m.benign.gained} benign: "
            f"{'meets' if met else 'misses'} the target")
        if met:
            decision.chosen = c
            break
    # the unmitigated config was measured first as the baseline: it competes in its place in the order
    measured = [c for c in decision.order if c in bench.measured]
    i = runner_up([bench.measured[c][0] for c in measured], spec.target,
                  measured.index(decision.chosen) if decision.chosen else None)
    decision.runner_up = measured[i] if i is not None else None
    doc, files = _document(spec, rot_entry, pcr.fidelity, evidence_layers, choice, patched, decision, bench)
    written = write_deployment(spec.out, files, doc)
    return ExportResult(doc, spec.out, tuple(written))


def _deployment(spec: ExportSpec, final: cands.Candidate, patched: Patched | None) -> tuple[Deployment, dict[str, Path]]:
    """What to run, and the smoothed files to copy when they are it."""
    m = spec.model
    if not final.smoothed:
        adapter = _file_ref(spec.adapter, spec.adapter_sha, spec.adapter.stat().st_size) if spec.adapter else None
        model = _file_ref(m.path, m.sha256, m.size_bytes)
        files: dict[str, Path] = {}
    else:
        model = FileRef(patched.model.name, patched.info["model_sha256"], patched.info["model_bytes"])
        adapter = (FileRef(patched.adapter.name, patched.info["adapter_sha256"], patched.adapter.stat().st_size)
                   if patched.adapter else None)
        files = {patched.model.name: patched.model} | ({patched.adapter.name: patched.adapter} if patched.adapter else {})
    launch = Launch(final.kv.type_k, final.kv.type_v, final.rotation, spec.options.n_ctx, True, final.layer_types)
    return Deployment(model, adapter, launch), files


def _candidate_rows(spec: ExportSpec, decision: Decision, bench: CalibBench) -> list[dict]:
    rows = []
    for c in decision.order:
        row = c.to_dict(spec.model) | {"prescription": c == decision.prescription}
        if c in bench.measured:
            meas, where = bench.measured[c]
            row |= {"measured": meas.to_dict() | where, "meets_target": spec.target.met(meas)}
        else:
            why = decision.skipped.get(c, "a cheaper candidate met the target first" if decision.chosen else "")
            row |= {"measured": None, "meets_target": None, "not_measured": why}
        rows.append(row)
    return rows


def _document(spec: ExportSpec, rot_entry: RotationResult, fidelity: Fidelity, evidence_layers: list[int], choice,
              patched: Patched | None, decision: Decision, bench: CalibBench) -> tuple[dict, dict[str, bytes | Path]]:
    """deploy.json and the files beside it."""
    m = spec.model
    final = decision.final
    dep, files = _deployment(spec, final, patched)
    launch = dep.launch
    for name, text in render_all(dep, f"kvedge deployment of {m.path.name}: KV {final.label}").items():
        files[name] = text.encode("utf-8")
    ollama_ok, ollama_note = ollama_support(launch)

    def kv_bytes(c: cands.Candidate) -> dict:
        bpt = c.bytes_per_token(m)
        return {"kv_bytes_per_token": bpt, "kv_bytes_at_ctx": bpt * spec.options.n_ctx,
                "kv_mib_at_ctx": bpt * spec.options.n_ctx / 2**20}

    for name in ("pcr.json", "pcr.md"):
        files[f"evidence/{name}"] = spec.work / "pcr" / name
    audits: dict[str, dict] = {}
    for which, rep in bench.final_reports().items():
        files[f"evidence/calib-{which}.json"] = (json.dumps(rep, indent=2) + "\n").encode("utf-8")
        audits[which] = {"report": f"evidence/calib-{which}.json",
                         "store": str((bench.orig_dir if which == "original" else bench.smooth_dir) / "kvedge.sqlite"),
                         "runs": [{"label": r["label"], "key": r["key"]} for r in rep["runs"]]}
    orig = bench.reports["original"]
    chosen = decision.chosen
    source_adapter = _file_ref(spec.adapter, spec.adapter_sha, spec.adapter.stat().st_size) if spec.adapter else None
    doc = {
        "schema": SCHEMA,
        "kvedge_version": __version__,
        "deployment": dep.to_dict() | {
            "label": final.label, "kind": final.kind, "smoothed": final.smoothed, **kv_bytes(final),
            "rotation_requirement": rotation_requirement(final.rotation), "env": launch.env,
        },
        "source": {"model": asdict(_file_ref(m.path, m.sha256, m.size_bytes)),
                   "adapter": asdict(source_adapter) if source_adapter else None},
        "unmitigated": {"type_k": spec.kv.type_k, "type_v": spec.kv.type_v, "rotation": spec.rotation,
                        "label": decision.unmitigated.label, **kv_bytes(decision.unmitigated)},
        "target": spec.target.to_dict(),
        "decision": {
            "qualified": chosen is not None,
            "chosen": chosen.label if chosen else None,
            "reason": (f"{chosen.label} is the fewest KV bytes that meets the target on the calib split"
                       if chosen else "no candidate met the target on the calib split: kvedge recommends the f16 "
                       "cache (the reference) rather than a configuration it could not show to be safe"),
            "runner_up": decision.runner_up.label if decision.runner_up else None,
            "prescription": {"label": decision.prescription.label, "verdict": rot_entry.verdict.mode,
                             "was_chosen": chosen == decision.prescription,
                             "file": _prescription_file(decision.prescription, patched)},
            "unmitigated_on_calib": bench.measured[decision.unmitigated][0].to_dict(),
            "candidates": _candidate_rows(spec, decision, bench),
        },
        "smoothing": _smoothing_doc(choice, patched),
        "evidence": {
            "pcr": {"report": "evidence/pcr.json", "verdict": rot_entry.verdict.to_dict(),
                    "evidence_layers": evidence_layers, "damage": rot_entry.all_layers.k_and_v.damage.to_dict(),
                    "concentration": rot_entry.concentration.to_dict(), "fidelity": fidelity.to_dict()},
            "calib": {"split": "calib", "limit": spec.limit, "n_prompts": orig["prompts_summary"]["n"],
                      "max_tokens": spec.max_tokens, "detector": orig["detector"], "backend": orig["backend"]["kind"],
                      "noise_floor": {k: orig["noise_floor"][k] for k in ("label", "flip_rate", "harmful", "benign")},
                      "audits": audits},
        },
        "renderings": {"llama-server": "llama-server.sh", "llama-cli": "llama-cli.sh",
                       "llama-cpp-python": "llama-cpp-python.json",
                       "ollama": {"expressible": ollama_ok, "note": ollama_note,
                                  "files": ["Modelfile", "ollama.env"] if ollama_ok else []}},
    }
    from ..report.mitigate import render_export_markdown

    files["DEPLOY.md"] = render_export_markdown(doc).encode("utf-8")
    return doc, files


def _prescription_file(p: cands.Candidate, patched: Patched | None) -> dict | None:
    """Where the smoothed files are when PCR prescribed them (verify can measure them beside the choice)."""
    if not p.smoothed or patched is None or not patched.passed:
        return None
    return {"model": asdict(FileRef(str(patched.model.resolve()), patched.info["model_sha256"], patched.info["model_bytes"])),
            "adapter": asdict(FileRef(str(patched.adapter.resolve()), patched.info["adapter_sha256"],
                                      patched.adapter.stat().st_size)) if patched.adapter else None}


def _smoothing_doc(choice, patched: Patched | None) -> dict | None:
    if choice is None:
        return None
    out = {"simulation": choice.to_dict()}
    if patched is not None:
        out |= {"patch": patched.info["patch"], "self_check": patched.info["self_check"]}
    return out


def check_out_dir(out: Path) -> None:
    """The deployment folder must be new or empty, and writable."""
    check_new_folder(out, ExportError)


def write_deployment(out: Path, files: dict[str, bytes | Path], doc: dict) -> list[Path]:
    """Every file, then deploy.json listing each one's sha256 and size, all or nothing (io.write_folder)."""
    from ..gguf.model import sha256_file

    def manifest(stage: Path) -> bytes:
        doc["files"] = {name: {"sha256": sha256_file(stage / name), "size_bytes": (stage / name).stat().st_size}
                        for name in files}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    return write_folder(out, files, "deploy.json", manifest, ExportError)
