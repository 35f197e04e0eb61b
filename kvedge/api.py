"""The library API the CLI calls, usable from a notebook: `kvedge.api.audit(...)` does what
`kvedge audit` does and returns the report dict with the paths it wrote. All validation happens here,
cheapest first and before any model is hashed or run; the CLI only parses and renders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .audit import MAX_BATCH, AuditSpec, auto_batch, run_audit
from .canary import canary_adapter_path
from .datasets import DEFAULT_BENCHMARKS, parse_benchmarks, select_prompts
from .detect import Detector, default_detector
from .errors import KvedgeError
from .lora import check_adapter
from .model import ModelInfo, load_model
from .registry import NOISE_VARIANTS
from .report import write_pair
from .runtime import LLAMA_CPP, RuntimeFactory, RuntimeOptions, parse_kv, parse_kv_list, parse_rotation
from .server import parse_servers
from .server.runtime import DEFAULT_PATIENCE, DEFAULT_TIMEOUT
from .store import Store
from .summary import summarize
from .template import chat_template_for

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


DEFAULT_KV, DEFAULT_ROTATION = "f16,q8_0,q4_0", "both"


def audit(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str | None = None,
    rotation: str | None = None,
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
    batch: int | None = None,
    runtimes: RuntimeFactory = LLAMA_CPP,
    server: Sequence[str] = (),
    server_kv: str | None = None,
    server_timeout: float = DEFAULT_TIMEOUT,
    server_patience: float = DEFAULT_PATIENCE,
) -> AuditResult:
    """With no `model`, audits the embedded default model with the canary adapter; `canary=False`
    audits the bare default model. `runtimes` is where llama.cpp contexts come from (a test can pass a
    fake). `batch` prompts are decoded together (None: chosen from the model's KV size; 1: one at a
    time). The report's `gate` says whether `fail_under` was met; the CLI turns a miss into exit 1.

    `server` audits running servers (URLs, with statements such as `#kv=q4_0,rot=on`; docs/server.md)
    instead of the `kv` x `rotation` configs: their settings are the configs, and the f16 reference and
    noise run come from an f16 server where one is given, else from this process. `server_kv` states the
    cache types of servers that state none; `server_timeout` bounds one request and `server_patience` how
    long a server may stay unreachable before the audit stops (resumable)."""
    servers = parse_servers(server, server_kv)  # cheap checks first: bad flags fail before the model is hashed
    if server_kv and not servers:
        raise KvedgeError("--server-kv states the KV cache of --server endpoints: give --server URL")
    if servers and (kv is not None or rotation is not None):
        raise KvedgeError("--kv and --rotation choose in-process configs; a server audit's configs are its servers' "
                          "settings (state them with --server-kv or URL#kv=...,rot=...)")
    if server_timeout <= 0 or server_patience < 0:
        raise KvedgeError("--server-timeout must be positive and --server-patience not negative")
    kv = DEFAULT_KV if kv is None else kv
    rotation = DEFAULT_ROTATION if rotation is None else rotation
    configs = parse_kv_list(kv)
    parse_rotation(rotation)
    if noise is not None and noise not in NOISE_VARIANTS:
        raise KvedgeError(f"unknown --noise {noise!r}: choose from {', '.join(NOISE_VARIANTS.names())} or none")
    if fail_under is not None and not 0 <= fail_under <= 1:
        raise KvedgeError(f"--fail-under takes a share between 0 and 1, not {fail_under}")
    if max_tokens < 1 or ctx < 64:
        raise KvedgeError("--max-tokens must be at least 1 and --ctx at least 64")
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise KvedgeError(f"--batch must be between 1 and {MAX_BATCH}, not {batch}")
    names = parse_benchmarks(benchmarks)
    selected = select_prompts(names, split, limit, prompts)
    info = load_model(model)
    adapter = _adapter_for(model, lora, canary)
    for c in configs:
        c.check_fits(info)
    det = detector or default_detector()
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
        batch=batch or auto_batch(info),
        detector=det,
    )
    served = None
    if servers:
        from .server.prepare import prepare

        served = prepare(servers, info, adapter, selected, chat_template_for(info), system, noise,
                         spec.runtime_options, runtimes, spec.store_path, server_timeout, server_patience)
        spec, runtimes = dataclasses.replace(spec, explicit_runs=served.plan.runs), served.runtimes
    try:
        outcome = run_audit(spec, progress=progress, runtimes=runtimes)
    finally:
        if served:
            served.runtimes.close()
    with Store(spec.store_path) as store:
        summary = summarize(outcome, store.audit_rows([r.key for r in outcome.runs], outcome.reference.key),
                            det, fail_under)
        if summary.stability:
            s = summary.stability
            store.put_stability(s.ref_key, s.noise_key, s.detector, list(s.marks))
        if served:
            from .server.report import annotate

            annotate(summary.report, outcome, served, store)
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
