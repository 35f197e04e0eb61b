"""An export's result: deploy.json (schema kvedge.deploy/2, docs/reference/deploy-schema.md), the
deployment it pins and the evidence of how it was chosen. `kvedge.mitigate.export` builds it,
`kvedge.mitigate.deploy` renders the deployment for each runtime, `kvedge verify` reads it back."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..llama.runtime import ROTATION_ENV
from ..stats import Estimate
from . import Result, omit_none
from .audit import Equivalence, FlipCounts, Verdict

SCHEMA = "kvedge.deploy/2"

# how a deployment's precondition is checked (kvedge.mitigate.preconditions), in words
PRECONDITION_CHECKS = {
    "rendered": "written into each launch file; `kvedge verify` reads it back",
    "doctor": "run `kvedge doctor MODEL` on the device: it lists each backend's flash-attention kernels per K/V "
              "pair and the rotation llama.cpp applies per side",
    "unobservable": "kvedge cannot see it from outside the runtime: check it yourself",
}


@dataclass(frozen=True)
class FileRef:
    """A file the deployment uses: `path` is relative to the deployment folder for files export wrote
    there, absolute for files it only points at (the unpatched model)."""

    path: str
    sha256: str
    size_bytes: int

    def resolve(self, root: Path) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() else Path(root) / p

    @property
    def inside(self) -> bool:
        return not Path(self.path).is_absolute()

    @classmethod
    def from_dict(cls, d: dict) -> "FileRef":
        return cls(str(d["path"]), str(d["sha256"]), int(d["size_bytes"]))


@dataclass(frozen=True)
class Launch:
    """How the runtime must run the model. `rotation`: whether the verified configuration had llama.cpp's
    attention rotation of quantized caches."""

    type_k: str
    type_v: str
    rotation: bool
    n_ctx: int
    flash_attn: bool = True
    layer_types: tuple[tuple[str, str], ...] | None = None  # per-layer (type_k, type_v), where a runtime offers it
    # the model carries kvedge's K transform, which the runtime must apply (kvedge's native llama.cpp only)
    k_transform: bool = False

    @property
    def env(self) -> dict[str, str | None]:
        """The environment the runtime needs (None: must be unset): llama.cpp's rotation switch."""
        return {ROTATION_ENV: None if self.rotation else "1"}

    @classmethod
    def from_dict(cls, d: dict) -> "Launch":
        lt = d.get("layer_types")
        return cls(d["type_k"], d["type_v"], bool(d["rotation"]), int(d["n_ctx"]), bool(d.get("flash_attn", True)),
                   tuple((a, b) for a, b in lt) if lt else None, bool(d.get("k_transform", False)))


@dataclass(frozen=True)
class Deployment:
    model: FileRef
    adapter: FileRef | None
    launch: Launch

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "adapter": asdict(self.adapter) if self.adapter else None,
                "launch": asdict(self.launch)}

    @classmethod
    def from_dict(cls, d: dict) -> "Deployment":
        return cls(FileRef.from_dict(d["model"]), FileRef.from_dict(d["adapter"]) if d.get("adapter") else None,
                   Launch.from_dict(d["launch"]))


@dataclass(frozen=True)
class Measured(Result):
    """A candidate measured on the calib split, judged against the original model's f16 by the one verdict
    function (kvedge.audit.verdict), with the flips it rests on."""

    verdict: Verdict
    harmful: FlipCounts
    benign: FlipCounts
    audit: str  # original | smoothed: whose audit store holds it
    store_key: str
    report_label: str
    kld: Estimate
    ppl_ratio: Estimate

    @property
    def equivalent(self) -> bool:
        return self.verdict.verdict == "equivalent"


@dataclass(frozen=True, kw_only=True)
class CandidateDoc(Result):
    label: str
    kind: str  # kv | smoothed | per-layer
    type_k: str
    type_v: str
    rotation: bool
    smoothed: bool
    layer_types: list[list[str]] | None
    kv_bytes_per_token: int
    prescription: bool  # PCR's prescription
    measured: Measured | None
    not_measured: str | None = omit_none()  # why: the sequence stopped earlier, or a failed self-check


@dataclass(frozen=True)
class Decision(Result):
    qualified: bool  # a candidate was shown equivalent; false: the deployment is the f16 cache
    chosen: str | None
    reason: str
    stopped_at: str | None  # the first candidate of the sequence not shown equivalent
    prescription: dict[str, Any]  # label, verdict (PCR's mode), was_chosen, file (smoothed files, when measurable)
    unmitigated_on_calib: Measured
    candidates: list[CandidateDoc]


@dataclass(frozen=True, kw_only=True)
class DeploymentDoc(Result):
    model: FileRef
    adapter: FileRef | None
    launch: Launch
    label: str
    kind: str
    smoothed: bool
    kv_bytes_per_token: int
    kv_bytes_at_ctx: int
    kv_mib_at_ctx: float
    rotation_requirement: str
    env: dict[str, str | None]
    # what must hold in the runtime (kvedge.mitigate.preconditions); absent from deploy.json before kvedge 0.2
    preconditions: list[dict[str, Any]] | None = omit_none()

    @property
    def deployment(self) -> Deployment:
        return Deployment(self.model, self.adapter, self.launch)


@dataclass(frozen=True)
class Unmitigated(Result):
    type_k: str
    type_v: str
    rotation: bool
    label: str
    kv_bytes_per_token: int
    kv_bytes_at_ctx: int
    kv_mib_at_ctx: float


@dataclass(frozen=True, kw_only=True)
class DeployDocument(Result):
    """deploy.json."""

    schema: str
    kvedge_version: str
    deployment: DeploymentDoc
    source: dict[str, FileRef | None]  # model, adapter: the files export started from
    unmitigated: Unmitigated
    equivalence: Equivalence
    decision: Decision
    smoothing: dict[str, Any] | None  # the simulation's table and choice, the patch, the self-check
    evidence: dict[str, Any]  # pcr: the diagnosis; calib: the audits every figure rests on
    renderings: dict[str, Any]
    files: dict[str, dict[str, Any]] = omit_none()  # every other file: {sha256, size_bytes}; set when written
    k_transform: dict[str, Any] | None = omit_none()  # the K transform's simulation, file and self-check, when considered
