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


def _pcr_spec(model, lora, kv: str, rotation: str, ctx: int, threads: int | None, canary: bool):
    from .pcr.run import PcrSpec
    from .runtime import parse_kv

    if rotation not in ("on", "off", "both"):
        raise KvedgeError(f"--rotation must be on, off or both, not {rotation!r}")
    config = parse_kv(kv)
    if not config.quantized:
        raise KvedgeError(f"PCR diagnoses a quantized cache; {config.name} is not one")
    info = load_model(model)
    from .calib.gguf_torch import check_architecture

    check_architecture(info.architecture)  # before any llama.cpp or torch work
    if lora is None and model is None and canary:
        lora = canary_adapter_path()
    adapter = check_adapter(lora) if lora else None
    rotations = {"on": (True,), "off": (False,), "both": (True, False)}[rotation]
    spec = PcrSpec(info, adapter, config, rotations, RuntimeOptions(n_ctx=ctx, n_threads=threads))
    stem = info.stem + (f"+{adapter.stem}" if adapter else "")
    return spec, stem


def pcr(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = "q4_0",
    rotation: str = "both",
    ctx: int = 2048,
    threads: int | None = None,
    out: str | Path | None = None,
    canary: bool = True,
    log=None,
) -> tuple[dict[str, Any], Path, Path]:
    """The PCR diagnostic (kvedge pcr): returns the report dict and the JSON and Markdown paths."""
    from .pcr.report import render_markdown, write_reports
    from .pcr.run import run_pcr

    spec, stem = _pcr_spec(model, lora, kv, rotation, ctx, threads, canary)
    rep = run_pcr(spec, log or (lambda m: None))
    out_dir = Path(out) if out else Path("kvedge-runs") / stem / f"pcr-{spec.kv.name}"
    jp, mp = write_reports(rep, render_markdown(rep), out_dir, "pcr")
    return rep, jp, mp


def sweep(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    rotation: str = "both",
    bits: str = "2-8",
    ctx: int = 2048,
    threads: int | None = None,
    out: str | Path | None = None,
    canary: bool = True,
    log=None,
) -> tuple[dict[str, Any], Path, Path]:
    """The bit-width sweep (kvedge sweep): returns the report dict and the JSON and Markdown paths."""
    from .pcr.report import write_reports
    from .pcr.sweep import render_sweep_markdown, run_sweep

    widths = parse_bits(bits)
    spec, stem = _pcr_spec(model, lora, "q4_0", rotation, ctx, threads, canary)
    rep = run_sweep(spec, widths, log or (lambda m: None))
    out_dir = Path(out) if out else Path("kvedge-runs") / stem / "sweep"
    jp, mp = write_reports(rep, render_sweep_markdown(rep), out_dir, "sweep")
    return rep, jp, mp


def parse_bits(spec: str) -> tuple[int, ...]:
    """`2-8` or `2,3,4`: widths for the sweep, each in 2..8."""
    try:
        if "-" in spec:
            a, b = (int(x) for x in spec.split("-", 1))
            widths = tuple(range(a, b + 1))
        else:
            widths = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise KvedgeError(f"malformed --bits {spec!r}: write 2-8 or 2,4,8") from None
    if not widths or min(widths) < 2 or max(widths) > 8:
        raise KvedgeError(f"--bits must lie in 2..8, not {spec!r}")
    return widths
