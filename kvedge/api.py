"""The library API the CLI calls, usable from a notebook: `kvedge.api.audit(...)` does what
`kvedge audit` does and returns the report dict with the paths it wrote. All validation happens here,
cheapest first and before any model is hashed or run; the CLI only parses and renders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .audit import AuditSpec, run_audit
from .canary import canary_adapter_path
from .datasets import DEFAULT_BENCHMARKS, parse_benchmarks, select_prompts
from .detect import Detector, default_detector
from .errors import KvedgeError
from .lora import check_adapter
from .model import ModelInfo, load_model
from .registry import NOISE_VARIANTS
from .report import write_pair
from .runtime import LLAMA_CPP, RuntimeFactory, RuntimeOptions, parse_kv, parse_kv_list, parse_rotation
from .store import Store
from .summary import summarize

Log = Callable[[str], None]


@dataclass(frozen=True)
class AuditResult:
    report: dict[str, Any]
    json_path: Path
    md_path: Path
    store_path: Path
    generated: int


def _adapter_for(model: str | Path | None, lora: str | Path | None, canary: bool) -> Path | None:
    """With no model and no adapter, the default model is audited with the canary (a base that refuses
    nothing has no refusals to lose); `canary=False` audits the bare default model."""
    if lora is None and model is None and canary:
        lora = canary_adapter_path()
    return check_adapter(lora) if lora else None


def _stem(info: ModelInfo, adapter: Path | None) -> str:
    return info.stem + (f"+{adapter.stem}" if adapter else "")


def audit(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = "f16,q8_0,q4_0",
    rotation: str = "both",
    benchmarks: str = ",".join(DEFAULT_BENCHMARKS),
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
    runtimes: RuntimeFactory = LLAMA_CPP,
) -> AuditResult:
    """With no `model`, audits the embedded default model with the canary adapter; `canary=False`
    audits the bare default model. `runtimes` is where llama.cpp contexts come from (a test can pass a
    fake). The report's `gate` says whether `fail_under` was met; the CLI turns a miss into exit 1."""
    configs = parse_kv_list(kv)  # cheap checks first: bad flags fail before the model is hashed
    parse_rotation(rotation)
    if noise is not None and noise not in NOISE_VARIANTS:
        raise KvedgeError(f"unknown --noise {noise!r}: choose from {', '.join(NOISE_VARIANTS.names())} or none")
    if fail_under is not None and not 0 <= fail_under <= 1:
        raise KvedgeError(f"--fail-under takes a share between 0 and 1, not {fail_under}")
    if max_tokens < 1 or ctx < 64:
        raise KvedgeError("--max-tokens must be at least 1 and --ctx at least 64")
    names = parse_benchmarks(benchmarks)
    selected = select_prompts(names, split, limit, prompts)
    info = load_model(model)
    adapter = _adapter_for(model, lora, canary)
    for c in configs:
        c.check_fits(info)
    spec = AuditSpec(
        model=info,
        prompts=tuple(selected),
        kv=tuple(configs),
        rotation=rotation,
        lora_path=adapter,
        max_tokens=max_tokens,
        options=RuntimeOptions(n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers),
        system=system,
        out_dir=Path(out) if out else Path("kvedge-runs") / _stem(info, adapter),
        noise=noise,
    )
    outcome = run_audit(spec, progress=progress, runtimes=runtimes)
    det = detector or default_detector()
    with Store(spec.store_path) as store:
        summary = summarize(outcome, store.audit_rows([r.key for r in outcome.runs], outcome.reference.key),
                            det, fail_under)
        if summary.stability:
            s = summary.stability
            store.put_stability(s.ref_key, s.noise_key, s.detector, list(s.marks))
    from .report.audit import render_markdown

    jp, mp = write_pair(summary.report, render_markdown(summary.report), spec.out_dir, "report")
    return AuditResult(summary.report, jp, mp, spec.store_path, outcome.generated)


def compare(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Verdict agreement between two audits of one model and its prompts (kvedge compare); with `out`,
    the comparison is also written there as JSON."""
    import json

    from .atomic import atomic_write_text
    from .compare import compare_runs

    result = compare_runs(run_a, run_b)
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def _pcr_spec(model, lora, kv: str, rotation: str, ctx: int, threads: int | None, canary: bool):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KvedgeError("this command runs a torch pass: install it with pip install 'kvedge[pcr]' "
                          "(CPU torch==2.13.0)") from None
    from .calib.gguf_torch import check_architecture
    from .pcr.run import PcrSpec

    rotations = parse_rotation(rotation)
    config = parse_kv(kv)
    if not config.quantized:
        raise KvedgeError(f"PCR diagnoses a quantized cache; {config.name} is not one")
    info = load_model(model)
    check_architecture(info.architecture)  # before any llama.cpp or torch work
    config.check_fits(info)
    adapter = _adapter_for(model, lora, canary)
    spec = PcrSpec(info, adapter, config, rotations, RuntimeOptions(n_ctx=ctx, n_threads=threads))
    return spec, _stem(info, adapter)


def pcr(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = "q4_0",
    rotation: str = "both",
    ctx: int = 2048,
    threads: int | None = None,
    out: str | Path | None = None,
    canary: bool = True,
    log: Log | None = None,
) -> tuple[dict[str, Any], Path, Path]:
    """The PCR diagnostic (kvedge pcr): returns the report dict and the JSON and Markdown paths."""
    from .pcr.run import run_pcr
    from .report.pcr import render_markdown

    spec, stem = _pcr_spec(model, lora, kv, rotation, ctx, threads, canary)
    rep = run_pcr(spec, log or (lambda m: None))
    out_dir = Path(out) if out else Path("kvedge-runs") / stem / f"pcr-{spec.kv.name}"
    jp, mp = write_pair(rep, render_markdown(rep), out_dir, "pcr")
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
    log: Log | None = None,
) -> tuple[dict[str, Any], Path, Path]:
    """The bit-width sweep (kvedge sweep): returns the report dict and the JSON and Markdown paths."""
    from .pcr.sweep import run_sweep
    from .report.sweep import render_sweep_markdown

    widths = parse_bits(bits)
    spec, stem = _pcr_spec(model, lora, "q4_0", rotation, ctx, threads, canary)
    rep = run_sweep(spec, widths, log or (lambda m: None))
    out_dir = Path(out) if out else Path("kvedge-runs") / stem / "sweep"
    jp, mp = write_pair(rep, render_sweep_markdown(rep), out_dir, "sweep")
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


SMOOTH_MODES = ("auto", "force", "off")


def export(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = "q4_0",
    rotation: str = "on",
    target: str | float = "noise",
    out: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int = 64,
    ctx: int = 4096,
    threads: int | None = None,
    smooth: str = "auto",
    work: str | Path | None = None,
    canary: bool = True,
    progress: bool = True,
    log: Log | None = None,
):
    """kvedge export: the smallest KV configuration (K/V types, or the smoothed model at `kv`) that meets
    `target` on the calib split, written to `out` as deploy.json and each runtime's launch files. `kv` is
    the unmitigated configuration wanted; `rotation` whether the target runtime rotates (on|off).
    Returns `mitigate.export.ExportResult`."""
    from .calib.gguf_torch import check_architecture
    from .mitigate.choose import parse_target
    from .mitigate.export import ExportSpec, check_out_dir, run_export
    from .mitigate.gguf_patch import PatchError, check_space

    config = parse_kv(kv)
    if not config.quantized:
        raise KvedgeError(f"--kv {config.name} is not quantized: nothing to mitigate (f16 is the reference)")
    rotations = parse_rotation(rotation)
    if len(rotations) != 1:
        raise KvedgeError("--rotation for a deployment is on or off: the runtime either rotates or it does not")
    goal = parse_target(target)
    if smooth not in SMOOTH_MODES:
        raise KvedgeError(f"--smooth must be one of {', '.join(SMOOTH_MODES)}, not {smooth!r}")
    if out is None:
        raise KvedgeError("--out DIR is required: the deployment folder to write")
    if limit is not None and limit < 1:
        raise KvedgeError("--limit must be at least 1")
    if max_tokens < 1 or ctx < 64:
        raise KvedgeError("--max-tokens must be at least 1 and --ctx at least 64")
    out = Path(out)
    check_out_dir(out)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KvedgeError("export diagnoses with a torch pass: install it with pip install 'kvedge[pcr]'") from None
    info = load_model(model)
    check_architecture(info.architecture)
    config.check_fits(info)
    adapter = _adapter_for(model, lora, canary)
    if smooth != "off":
        # the smoothed copies may land in the deployment folder: room for them before any work
        try:
            check_space(out, info.size_bytes + (adapter.stat().st_size if adapter else 0), "the smoothed model")
        except PatchError as exc:
            raise KvedgeError(str(exc)) from None
    stem = _stem(info, adapter)
    spec = ExportSpec(
        model=info, adapter=adapter, kv=config, rotation=rotations[0], target=goal, out=out,
        work=Path(work) if work else Path("kvedge-runs") / stem / f"export-{config.name.replace('/', '_')}-rot-{rotation}",
        limit=limit, max_tokens=max_tokens, options=RuntimeOptions(n_ctx=ctx, n_threads=threads), smooth=smooth,
    )
    return run_export(spec, log or (lambda m: None), progress)


def verify(
    deployment: str | Path,
    target: str | float | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    threads: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> tuple[dict[str, Any], Path, Path]:
    """kvedge verify: audit exactly what DEPLOY_DIR/deploy.json says on the eval split, beside the unmitigated
    config and f16. `target` overrides the export's (e.g. a stricter CI gate). Returns the report (its
    `gate.passed` is the verdict; the CLI turns a miss into exit 1) and the JSON and Markdown paths."""
    from .mitigate.choose import Target, parse_target
    from .mitigate.verify import VerifySpec, load_deployment, run_verify
    from .report.mitigate import render_verify_markdown

    goal = parse_target(target) if target is not None else None
    if limit is not None and limit < 1:
        raise KvedgeError("--limit must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise KvedgeError("--max-tokens must be at least 1")
    folder = Path(deployment)
    doc, dep = load_deployment(folder)
    if goal is None:
        t = doc["target"]
        goal = Target(t["kind"], t["value"])
    out_dir = Path(out) if out else folder / "verify"
    spec = VerifySpec(folder, doc, dep, goal, out_dir, limit,
                      max_tokens or doc["evidence"]["calib"]["max_tokens"], RuntimeOptions(n_threads=threads))
    rep = run_verify(spec, log or (lambda m: None), progress)
    jp, mp = write_pair(rep, render_verify_markdown(rep), out_dir, "verify")
    return rep, jp, mp
