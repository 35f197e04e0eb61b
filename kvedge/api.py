"""The library API the CLI calls, usable from a notebook: `kvedge.api.audit(...)` does what
`kvedge audit` does and returns the report dict with the paths it wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audit import NOISE_VARIANTS, AuditSpec, load_model, run_audit
from .canary import canary_adapter_path
from .datasets import parse_benchmarks, select_prompts
from .detect import Detector, default_detector
from .errors import KvedgeError, ModelFileError
from .model import read_metadata
from .report import write_reports
from .runtime import RuntimeOptions, parse_kv_list
from .store import Store
from .summary import summarize


@dataclass(frozen=True)
class AuditResult:
    report: dict[str, Any]
    json_path: Path
    md_path: Path
    store_path: Path
    generated: int


def check_adapter(path: str | Path) -> Path:
    """A LoRA adapter must be a complete GGUF that says it is one."""
    p = Path(path)
    md, _ = read_metadata(p)
    if md.get("general.type") != "adapter":
        raise ModelFileError(f"{p} is not a LoRA adapter GGUF (general.type is {md.get('general.type')!r})")
    return p.resolve()


def audit(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = "f16,q8_0,q4_0",
    rotation: str = "both",
    benchmarks: str = "advbench,harmbench,xstest",
    split: str = "eval",
    prompts: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int = 64,
    ctx: int = 4096,
    threads: int | None = None,
    gpu_layers: int = 0,
    system: str | None = None,
    noise: str | None = "flash-attn-off",
    out: str | Path | None = None,
    fail_under: float | None = None,
    progress: bool = True,
    detector: Detector | None = None,
    canary: bool = True,
) -> AuditResult:
    """With no `model`, audits the embedded default model with the canary adapter (a base that refuses
    nothing has no refusals to lose); `canary=False` audits the bare default model."""
    configs = parse_kv_list(kv)  # cheap checks first: bad flags fail before the model is hashed
    if noise is not None and noise not in NOISE_VARIANTS:
        raise KvedgeError(f"unknown --noise {noise!r}: choose from {', '.join(NOISE_VARIANTS)} or none")
    names = parse_benchmarks(benchmarks)
    selected = select_prompts(names, split, limit, prompts)
    info = load_model(model)
    if lora is None and model is None and canary:
        lora = canary_adapter_path()
    adapter = check_adapter(lora) if lora else None
    for c in configs:
        c.check_fits(info)
    stem = info.stem + (f"+{adapter.stem}" if adapter else "")
    spec = AuditSpec(
        model=info,
        prompts=tuple(selected),
        kv=tuple(configs),
        rotation=rotation,
        lora_path=adapter,
        max_tokens=max_tokens,
        options=RuntimeOptions(n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers),
        system=system,
        out_dir=Path(out) if out else Path("kvedge-runs") / stem,
        noise=noise,
    )
    outcome = run_audit(spec, progress=progress)
    det = detector or default_detector()
    with Store(spec.store_path) as store:
        report = summarize(outcome, store, det, fail_under)
        noise_run = next((r for r in outcome.runs if r.spec.is_noise), None)
        if noise_run:
            store.put_stability(outcome.reference.key, noise_run.key, report["detector"]["name"],
                                [(p["id"], p["text_sha256"], not p["unstable"]) for p in report["prompts"]])
    jp, mp = write_reports(report, spec.out_dir)
    return AuditResult(report, jp, mp, spec.store_path, outcome.generated)
