"""`kvedge export`: diagnose, build the mitigation the diagnosis calls for, test the candidates on the calib
split in one fixed order from the safest down, and write the deployment folder.

    diagnose (PCR, cached) -> smoothing (simulation, then the patched files, cached)
    -> K transform (simulation, then the model file carrying it, cached; native build only)
    -> candidates in sequence, each audited on calib and judged by the one verdict function; stop at the
       first not shown equivalent -> deploy the last that was (none: the f16 cache)
    -> deploy.json and each runtime's files, all or nothing

Every step that costs minutes is kept in the work folder, keyed by what it depends on, so a rerun resumes.
The deployment folder gets files only when everything succeeded (kvedge.io.write_folder).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__, defaults
from ..errors import ExportError
from ..gguf.model import ModelInfo, sha256_file
from ..io import check_new_folder, write_folder
from ..llama.runtime import F16, KVConfig, RuntimeOptions
from ..results.deploy import (
    SCHEMA,
    CandidateDoc,
    Decision,
    DeployDocument,
    Deployment,
    DeploymentDoc,
    FileRef,
    Launch,
    Measured,
    Unmitigated,
)
from ..results.pcr import Fidelity, RotationResult
from . import candidates as cands
from .bench import CalibBench, calib_equivalence
from .deploy import ollama_support, render_all
from .preconditions import preconditions, quantized, refusal, rotation_requirement
from .diagnose import TorchSide, diagnose, smoothing_choice
from .smooth import UNSMOOTHABLE
from .smoothing import Patched, build_patched
from . import ktransform

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportSpec:
    model: ModelInfo
    adapter: Path | None
    kv: KVConfig  # the unmitigated configuration the user wants to run
    rotation: bool
    out: Path
    work: Path
    limit: int | None = None
    max_tokens: int = defaults.MAX_TOKENS
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    smooth: str = defaults.SMOOTH  # auto | force | off
    delta: float | None = None  # the equivalence margin (--delta); None: from the calib noise run
    transform: str = "auto"  # auto | only | off: the K-transform candidate (kvedge.mitigate.ktransform)

    @property
    def adapter_sha(self) -> str | None:
        return sha256_file(self.adapter) if self.adapter else None

    @property
    def calib_options(self) -> RuntimeOptions:
        """How llama.cpp runs the PCR calibration prompts (the smoothing's statistics and self-check too)."""
        return RuntimeOptions(n_ctx=defaults.PCR_CTX, n_threads=self.options.n_threads)

    def key(self, **extra: Any) -> dict:
        return {"kvedge_version": __version__, "model_sha256": self.model.sha256, "adapter_sha256": self.adapter_sha,
                "kv": self.kv.name, "rotation": self.rotation, **extra}


@dataclass(frozen=True)
class ExportResult:
    deploy: DeployDocument
    out: Path
    files: tuple[Path, ...]


@dataclass
class Run:
    """What the sequence found: the order, the last candidate shown equivalent (None: none was), the first
    that was not, PCR's prescription, and why a candidate was skipped."""

    order: list[cands.Candidate]
    unmitigated: cands.Candidate
    prescription: cands.Candidate
    chosen: cands.Candidate | None = None
    stopped_at: cands.Candidate | None = None
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

    torch_ = TorchSide(spec, log)
    choice = None
    unsmoothable = UNSMOOTHABLE.get(spec.model.architecture)  # --smooth force/only was refused before any work
    if unsmoothable and spec.smooth == "auto" and verdict.mode == "outlier-crushes-safety":
        log(f"smoothing: not available for {spec.model.architecture}: {unsmoothable}")
    elif spec.smooth in ("force", "only") or (spec.smooth == "auto" and verdict.mode == "outlier-crushes-safety"):
        choice = smoothing_choice(spec, torch_, verdict, evidence_layers, log, rot_entry.evidence.population)
        log(f"smoothing: {choice.reason}")
    smoothed = choice is not None and choice.chosen is not None
    kt_choice = None
    if spec.transform == "only" or (spec.transform == "auto" and spec.smooth != "only"):
        why_not = ktransform.unavailable(spec.model)
        if why_not:
            log(f"K transform: not a candidate: {why_not}")
        else:
            kt_choice = ktransform.choice(spec, torch_, log)
            log(f"K transform: {kt_choice.reason}")
    transformed = kt_choice is not None and kt_choice.chosen is not None
    order = cands.sequence(spec.model, spec.kv, spec.rotation, verdict.carrier, smoothed, verdict.to_dict(),
                           transformed)
    if spec.smooth == "only":
        order = [c for c in order if c.smoothed]
    if spec.transform == "only":
        order = [c for c in order if c.transformed]
    run = Run(order, cands.Candidate("kv", spec.kv, spec.rotation),
              cands.prescription(verdict.to_dict(), spec.kv, spec.rotation, smoothed))
    bench = CalibBench(spec.model.path, spec.adapter, spec.rotation, spec.limit, spec.max_tokens,
                       RuntimeOptions(n_ctx=spec.options.n_ctx, n_threads=spec.options.n_threads), spec.work,
                       spec.delta, progress)
    log(f"calib split: f16 reference, noise run and the unmitigated {run.unmitigated.label}")
    bench.measure(run.unmitigated, spec.kv)
    log(f"calib split: testing {len(run.order)} candidates from the safest down, stopping at the first not shown "
        f"equivalent (+-{bench.equivalence_delta:.2f} nats)")
    patched: Patched | None = None
    built: ktransform.Transformed | None = None
    for c in run.order:
        if c.transformed:
            built = ktransform.build(spec, torch_, kt_choice, log)
            if not built.passed:
                run.skipped[c] = "the transformed model failed its self-check: " + built.info["self_check_summary"]
                log(run.skipped[c])
                continue
            bench.modified[c.kind] = (built.model, spec.adapter)
        if c.smoothed:
            # built when the sequence reaches it: a sequence that stops earlier never pays for it
            patched = build_patched(spec, torch_, choice, log)
            if not patched.passed:
                run.skipped[c] = "the smoothed model failed its self-check: " + patched.info["self_check_summary"]
                log(run.skipped[c])
                continue
            bench.modified[c.kind] = (patched.model, patched.adapter)
        m = bench.measure(c, spec.kv)
        log(f"  {m.verdict.line}")
        if not m.equivalent:
            run.stopped_at = c
            break
        run.chosen = c
    doc, files = _document(spec, rot_entry, pcr.fidelity, evidence_layers, choice, patched, run, bench, kt_choice,
                           built)
    doc, written = write_deployment(spec.out, files, doc)
    return ExportResult(doc, spec.out, tuple(written))


def _file_ref(path: Path, sha: str, size: int) -> FileRef:
    return FileRef(str(path.resolve()), sha, size)


def _deployment(spec: ExportSpec, final: cands.Candidate, patched: Patched | None,
                built: ktransform.Transformed | None) -> tuple[Launch, FileRef, FileRef | None, dict[str, Path]]:
    """What to run, and the files export wrote to copy when they are it."""
    m = spec.model
    if final.transformed:
        model = FileRef(built.model.name, built.info["model_sha256"], built.info["model_bytes"])
        adapter = _file_ref(spec.adapter, spec.adapter_sha, spec.adapter.stat().st_size) if spec.adapter else None
        files = {built.model.name: built.model}
    elif not final.smoothed:
        adapter = _file_ref(spec.adapter, spec.adapter_sha, spec.adapter.stat().st_size) if spec.adapter else None
        model = _file_ref(m.path, m.sha256, m.size_bytes)
        files: dict[str, Path] = {}
    else:
        model = FileRef(patched.model.name, patched.info["model_sha256"], patched.info["model_bytes"])
        adapter = (FileRef(patched.adapter.name, patched.info["adapter_sha256"], patched.adapter.stat().st_size)
                   if patched.adapter else None)
        files = {patched.model.name: patched.model} | ({patched.adapter.name: patched.adapter} if patched.adapter else {})
    lt = final.layer_types(m)
    launch = Launch(final.kv.type_k, final.kv.type_v, final.rotation, spec.options.n_ctx, True,
                    tuple((a, b) for a, b in lt) if lt else None, k_transform=final.transformed)
    return launch, model, adapter, files


def _candidate_docs(spec: ExportSpec, run: Run, bench: CalibBench) -> list[CandidateDoc]:
    out = []
    for c in run.order:
        why = None
        if c not in bench.measured:
            why = run.skipped.get(c) or (f"not tested: the sequence stopped at {run.stopped_at.label}"
                                         if run.stopped_at else "not tested")
        lt = c.layer_types(spec.model)
        out.append(CandidateDoc(label=c.label, kind=c.kind, type_k=c.kv.type_k, type_v=c.kv.type_v, rotation=c.rotation,
                                smoothed=c.smoothed, layer_types=lt, kv_bytes_per_token=c.bytes_per_token(spec.model),
                                prescription=c == run.prescription, measured=bench.measured.get(c), not_measured=why))
    return out


def _reason(run: Run, stopped: Measured | None) -> str:
    """The decision in words: the last candidate shown equivalent and the first that was not."""
    why = f" ({stopped.verdict.verdict})" if stopped else ""
    if run.chosen:
        after = (f"; the next, {run.stopped_at.label}, was not{why}" if run.stopped_at
                 else "; so was every candidate down to the unmitigated config")
        return f"{run.chosen.label} is the last candidate of the sequence shown equivalent to f16 on the calib split{after}"
    first = run.stopped_at.label if run.stopped_at else run.order[0].label
    return (f"the first candidate of the sequence, {first}, was not shown equivalent to f16 on the calib split{why}: "
            "kvedge recommends the f16 cache rather than a configuration it could not show to be safe (an "
            "inconclusive candidate may be decided with more calib prompts: no --limit)")


def _document(spec: ExportSpec, rot_entry: RotationResult, fidelity: Fidelity, evidence_layers: list[int], choice,
              patched: Patched | None, run: Run, bench: CalibBench, kt_choice=None,
              built: ktransform.Transformed | None = None) -> tuple[DeployDocument, dict[str, bytes | Path]]:
    """deploy.json and the files beside it."""
    m = spec.model
    final = run.final
    launch, model_ref, adapter_ref, files = _deployment(spec, final, patched, built)
    why = refusal(launch, m)
    if why:  # the candidates never break these rules; a guard, so no folder ever states one that does
        raise ExportError(f"refusing to write a deployment no runtime can run as verified: {why}")
    pre = preconditions(launch, m)
    for name, text in render_all(Deployment(model_ref, adapter_ref, launch),
                                 f"kvedge deployment of {m.path.name}: KV {final.label}", pre).items():
        files[name] = text.encode("utf-8")
    ollama_ok, ollama_note = ollama_support(launch)
    ctx = spec.options.n_ctx

    def bytes_of(c: cands.Candidate) -> tuple[int, int, float]:
        bpt = c.bytes_per_token(m)
        return bpt, bpt * ctx, bpt * ctx / 2**20

    for name in ("pcr.json", "pcr.md"):
        files[f"evidence/{name}"] = spec.work / "pcr" / name
    audits: dict[str, dict] = {}
    for which, rep in bench.final_reports().items():
        files[f"evidence/calib-{which}.json"] = (json.dumps(rep.to_dict(), indent=2) + "\n").encode("utf-8")
        audits[which] = {"report": f"evidence/calib-{which}.json",
                         "store": str(bench.store_dir(which) / "kvedge.sqlite"),
                         "runs": [{"label": r.label, "key": r.key} for r in rep.runs]}
    orig = bench.reports["original"]
    bpt, at_ctx, mib = bytes_of(final)
    ubpt, uat_ctx, umib = bytes_of(run.unmitigated)
    stopped = bench.measured.get(run.stopped_at) if run.stopped_at else None
    doc = DeployDocument(
        schema=SCHEMA,
        kvedge_version=__version__,
        deployment=DeploymentDoc(model=model_ref, adapter=adapter_ref, launch=launch, label=final.label, kind=final.kind,
                                 smoothed=final.smoothed, kv_bytes_per_token=bpt, kv_bytes_at_ctx=at_ctx,
                                 kv_mib_at_ctx=mib, rotation_requirement=rotation_requirement(final.rotation, quantized(launch)),
                                 env=launch.env, preconditions=[p.to_dict() for p in pre]),
        source={"model": _file_ref(m.path, m.sha256, m.size_bytes),
                "adapter": _file_ref(spec.adapter, spec.adapter_sha, spec.adapter.stat().st_size) if spec.adapter else None},
        unmitigated=Unmitigated(spec.kv.type_k, spec.kv.type_v, spec.rotation, run.unmitigated.label, ubpt, uat_ctx, umib),
        equivalence=calib_equivalence(bench),
        decision=Decision(
            qualified=run.chosen is not None,
            chosen=run.chosen.label if run.chosen else None,
            reason=_reason(run, stopped),
            stopped_at=run.stopped_at.label if run.stopped_at else None,
            prescription={"label": run.prescription.label, "verdict": rot_entry.verdict.mode,
                          "was_chosen": run.chosen == run.prescription,
                          "file": _prescription_file(run.prescription, patched)},
            unmitigated_on_calib=bench.measured[run.unmitigated],
            candidates=_candidate_docs(spec, run, bench),
        ),
        smoothing=_smoothing_doc(choice, patched),
        k_transform=_transform_doc(kt_choice, built),
        evidence={
            "pcr": {"report": "evidence/pcr.json", "verdict": rot_entry.verdict.to_dict(),
                    "evidence_layers": evidence_layers, "damage": rot_entry.all_layers.k_and_v.damage.to_dict(),
                    "concentration": rot_entry.concentration.to_dict(), "fidelity": fidelity.to_dict()},
            "calib": {"split": "calib", "limit": spec.limit, "n_prompts": orig.prompts_summary.n,
                      "max_tokens": spec.max_tokens, "detector": orig.detector.to_dict(), "backend": orig.backend["kind"],
                      "noise_floor": {k: v for k, v in orig.noise_floor.to_dict().items()
                                      if k in ("label", "flip_rate", "harmful", "benign")},
                      "audits": audits},
        },
        renderings={"llama-server": "llama-server.sh", "llama-cli": "llama-cli.sh",
                    "llama-cpp-python": "llama-cpp-python.json",
                    "ollama": {"expressible": ollama_ok, "note": ollama_note,
                               "files": ["Modelfile", "ollama.env"] if ollama_ok else []}},
    )
    from ..report.mitigate import render_export_markdown

    files["DEPLOY.md"] = render_export_markdown(doc).encode("utf-8")
    return doc, files


def _prescription_file(p: cands.Candidate, patched: Patched | None) -> dict | None:
    """Where the smoothed files are when PCR prescribed them (verify can measure them beside the choice)."""
    if not p.smoothed or patched is None or not patched.passed:
        return None
    return {"model": dataclasses.asdict(FileRef(str(patched.model.resolve()), patched.info["model_sha256"],
                                                patched.info["model_bytes"])),
            "adapter": dataclasses.asdict(FileRef(str(patched.adapter.resolve()), patched.info["adapter_sha256"],
                                                  patched.adapter.stat().st_size)) if patched.adapter else None}


def _smoothing_doc(choice, patched: Patched | None) -> dict | None:
    if choice is None:
        return None
    out = {"simulation": choice.to_dict()}
    if patched is not None:
        out |= {"patch": patched.info["patch"], "self_check": patched.info["self_check"]}
    return out


def _transform_doc(kt_choice, built: ktransform.Transformed | None) -> dict | None:
    if kt_choice is None:
        return None
    # the fitted arrays are in the model file's metadata; deploy.json keeps the table and the choice
    out = {"simulation": {k: v for k, v in kt_choice.to_dict().items() if k != "transform"}}
    if built is not None:
        out |= {"file": {"model_sha256": built.info["model_sha256"], "model_bytes": built.info["model_bytes"]},
                "self_check": built.info["self_check"]}
    return out


def check_out_dir(out: Path) -> None:
    """The deployment folder must be new or empty, and writable."""
    check_new_folder(out, ExportError)


def write_deployment(out: Path, files: dict[str, bytes | Path],
                     doc: DeployDocument) -> tuple[DeployDocument, list[Path]]:
    """Every file, then deploy.json listing each one's sha256 and size, all or nothing (io.write_folder).
    Returns the document as written (with its file list) and the paths."""
    written: list[DeployDocument] = []

    def manifest(stage: Path) -> bytes:
        listing = {name: {"sha256": sha256_file(stage / name), "size_bytes": (stage / name).stat().st_size}
                   for name in files}
        written.append(dataclasses.replace(doc, files=listing))
        return (json.dumps(written[0].to_dict(), indent=2) + "\n").encode("utf-8")

    paths = write_folder(out, files, "deploy.json", manifest, ExportError)
    return written[0], paths
