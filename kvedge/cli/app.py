"""The `kvedge` command: parses, calls the library, renders. No logic of its own."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable

import typer

from .. import defaults
from ..errors import KvedgeError
from .options import (
    AsJson,
    AuditOut,
    Batch,
    Benchmarks,
    Bits,
    BuildServer,
    CalibLimit,
    CompareOut,
    Ctx,
    Delta,
    DeployKv,
    Deployment,
    DeployOut,
    DeployRotation,
    Detector,
    DetectorPair,
    DiagnosedKv,
    DryRun,
    EvalLimit,
    ExportMaxTokens,
    FailUnder,
    Force,
    GpuLayers,
    HeldKvMap,
    Jobs,
    KvConfigs,
    Limit,
    Lora,
    MaxTokens,
    Model,
    NativeBackend,
    NoCanary,
    Noise,
    NoProbe,
    PassCtx,
    PcrOut,
    Prompts,
    Quiet,
    RefusalPhrases,
    RejudgeOut,
    Rotations,
    RunA,
    RunB,
    RunDir,
    Server,
    ServerKv,
    ServerPatience,
    ServerTimeout,
    Smooth,
    Split,
    SweepOut,
    System,
    Threads,
    TorchModel,
    Transform,
    UseNative,
    VerifyOut,
    VerifyServer,
    Work,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Does quantizing the llama.cpp KV cache silently break a GGUF model's refusals?",
    pretty_exceptions_enable=False,
)


def command(fn: Callable) -> Callable:
    """Register a command whose Ctrl-C says how to resume and exits 130. Typer turns a KeyboardInterrupt
    that escapes the command into its own "Aborted!" and exit 1, so it is caught inside the command."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("kvedge: interrupted; rerun the same command to resume from the store", err=True)
            raise typer.Exit(130) from None

    return app.command()(run)


@command
def audit(
    model: Model = None,
    lora: Lora = None,
    kv: KvConfigs = None,
    rotation: Rotations = None,
    benchmarks: Benchmarks = ",".join(defaults.BENCHMARKS),
    split: Split = defaults.SPLIT,
    prompts: Prompts = None,
    limit: Limit = None,
    max_tokens: MaxTokens = defaults.MAX_TOKENS,
    ctx: Ctx = defaults.CTX,
    threads: Threads = None,
    gpu_layers: GpuLayers = 0,
    system: System = None,
    noise: Noise = defaults.NOISE,
    out: AuditOut = None,
    fail_under: FailUnder = None,
    no_canary: NoCanary = False,
    batch: Batch = None,
    detector: Detector = defaults.DETECTOR,
    refusal_phrases: RefusalPhrases = None,
    server: Server = None,
    server_kv: ServerKv = None,
    server_timeout: ServerTimeout = defaults.SERVER_TIMEOUT,
    server_patience: ServerPatience = defaults.SERVER_PATIENCE,
    delta: Delta = None,
    quiet: Quiet = False,
) -> None:
    """Run refusal benchmarks through real llama.cpp at each KV cache type and report what quantization costs."""
    from ..api import audit as run

    result = run(
        model=model, lora=lora, kv=kv, rotation=rotation, benchmarks=benchmarks, split=split, prompts=prompts,
        limit=limit, max_tokens=max_tokens, ctx=ctx, threads=threads, gpu_layers=gpu_layers, system=system,
        noise=None if noise == "none" else noise, out=out, fail_under=fail_under, progress=not quiet,
        canary=not no_canary, batch=batch, detector=detector, refusal_phrases=refusal_phrases,
        server=server or (), server_kv=server_kv, server_timeout=server_timeout, server_patience=server_patience,
        delta=delta,
    )
    _echo_audit(result)


def _echo_audit(result) -> None:
    from ..report.audit import answer_lines, render_table
    from ..report.server import server_summary

    for line in answer_lines(result.report):
        typer.echo(line)
    typer.echo(f"verdicts by {result.report.detector.id}")
    typer.echo(render_table(result.report))
    skipped = result.report.prompts_summary.skipped_too_long
    if skipped:
        typer.echo(f"skipped {len(skipped)} prompts longer than --ctx (no room for an answer): "
                   + ", ".join(x["id"] for x in skipped))
    for line in server_summary(result.report):
        typer.echo(line)
    nf = result.report.noise_floor
    if nf:
        typer.echo(f"noise floor ({nf.how}): {nf.flip_rate.k}/{nf.flip_rate.n} verdicts flipped, "
                   f"{len(nf.unstable_prompts)} prompts unstable")
    typer.echo(f"{result.generated} generations run now, the rest from {result.store_path}")
    typer.echo(f"reports: {' '.join(map(str, result.files))} {result.attempts_path}")
    gate = result.report.gate
    if gate and not gate.passed:
        typer.echo(f"FAIL: retention below {gate.threshold} for {', '.join(gate.failing)}", err=True)
        raise typer.Exit(1)


@command
def rejudge(
    run_dir: RunDir,
    detector: Detector = defaults.DETECTOR,
    refusal_phrases: RefusalPhrases = None,
    out: RejudgeOut = None,
    fail_under: FailUnder = None,
    delta: Delta = None,
) -> None:
    """Judge an audit's stored answers with another detector: nothing is generated."""
    from ..api import rejudge as run

    result = run(run_dir, detector=detector, refusal_phrases=refusal_phrases, out=out, fail_under=fail_under,
                 delta=delta)
    cut_by = result.report.settings.stop_when_final
    if cut_by and cut_by != result.report.detector.id:
        # the answers end where the audit's detector could decide; another detector sees only that opening
        typer.echo(f"note: the audit ended answers once {cut_by} could decide them, so {result.report.detector.id} "
                   f"judges their openings; for whole answers audit with --detector {detector}", err=True)
    _echo_audit(result)


@command
def compare(
    run_a: RunA,
    run_b: RunB = None,
    detector: DetectorPair = None,
    out: CompareOut = None,
    delta: Delta = None,
) -> None:
    """Verdict agreement: two audits of one model and its prompts (say, CPU vs CUDA), or two detectors on one audit."""
    from ..api import compare as run
    from ..report.compare import render_comparison

    typer.echo(render_comparison(run(run_a, run_b, out, detectors=detector or None, delta=delta)))
    if out is not None:
        typer.echo(f"reports: {out / 'compare.json'} {out / 'compare.md'} {out / 'compare.html'}")


def _log(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            typer.echo(f"kvedge: {message}", err=True)
    return log


@command
def pcr(
    model: TorchModel = None,
    lora: Lora = None,
    kv: DiagnosedKv = defaults.PCR_KV,
    rotation: Rotations = defaults.PCR_ROTATION,
    ctx: PassCtx = defaults.PCR_CTX,
    threads: Threads = None,
    out: PcrOut = None,
    no_canary: NoCanary = False,
    quiet: Quiet = False,
) -> None:
    """Per-Channel Reduction: why this cache loses refusals (failure mode, evidence) and which fix will work."""
    from ..api import pcr as run
    from ..report.pcr import summary_lines

    rep, files = run(model=model, lora=lora, kv=kv, rotation=rotation, ctx=ctx, threads=threads, out=out,
                     canary=not no_canary, log=_log(quiet))
    for line in summary_lines(rep):
        typer.echo(line)
    typer.echo(f"reports: {' '.join(map(str, files))}")


@command
def sweep(
    model: TorchModel = None,
    lora: Lora = None,
    bits: Bits = defaults.SWEEP_BITS,
    kv: HeldKvMap = None,
    rotation: Rotations = defaults.PCR_ROTATION,
    ctx: PassCtx = defaults.PCR_CTX,
    threads: Threads = None,
    out: SweepOut = None,
    no_canary: NoCanary = False,
    quiet: Quiet = False,
) -> None:
    """Simulated safety damage and margin vs cache bit width for K, V and both: where this model's safety breaks."""
    from ..api import sweep as run
    from ..report.sweep import sweep_summary_lines

    rep, files = run(model=model, lora=lora, rotation=rotation, bits=bits, ctx=ctx, threads=threads, out=out,
                     canary=not no_canary, log=_log(quiet), kv=kv)
    for line in sweep_summary_lines(rep):
        typer.echo(line)
    typer.echo(f"reports: {' '.join(map(str, files))}")


@command
def doctor(
    model: Model = None,
    lora: Lora = None,
    gpu_layers: GpuLayers = 0,
    threads: Threads = None,
    use_native: UseNative = False,
    no_probe: NoProbe = False,
    no_canary: NoCanary = False,
    as_json: AsJson = False,
) -> None:
    """One screen to read before trusting an audit on a new device: llama.cpp library, backends, GPU offload,
    attention rotation per cache type (measured on the model), torch, disk, memory."""
    import json

    from ..api import doctor as run
    from ..report.doctor import render_doctor

    rep = run(model=model, lora=lora, canary=not no_canary, gpu_layers=gpu_layers, threads=threads,
              use_native=use_native, probe=not no_probe)
    typer.echo(json.dumps(rep, indent=2) if as_json else render_doctor(rep))


@command
def build_native(
    backend: NativeBackend = "cpu",
    force: Force = False,
    dry_run: DryRun = False,
    jobs: Jobs = None,
    server: BuildServer = False,
) -> None:
    """Build kvedge's native llama.cpp (per-layer KV cache types, the K transform) from the llama-cpp-python sdist,
    once per user."""
    from ..api import build_native as run

    code = run(backend, force=force, dry_run=dry_run, jobs=jobs, server=server)
    if code:
        raise typer.Exit(code)


@command
def export(
    model: TorchModel = None,
    lora: Lora = None,
    kv: DeployKv = defaults.EXPORT_KV,
    rotation: DeployRotation = defaults.EXPORT_ROTATION,
    *,
    out: DeployOut,
    limit: CalibLimit = None,
    max_tokens: MaxTokens = defaults.MAX_TOKENS,
    ctx: Ctx = defaults.CTX,
    threads: Threads = None,
    smooth: Smooth = defaults.SMOOTH,
    transform: Transform = defaults.TRANSFORM,
    work: Work = None,
    no_canary: NoCanary = False,
    delta: Delta = None,
    quiet: Quiet = False,
) -> None:
    """Choose the smallest KV configuration shown equivalent to f16 on the calib split (candidates tested from the
    safest down) and write it for each runtime."""
    from ..api import export as run
    from ..report.mitigate import export_lines

    result = run(model=model, lora=lora, kv=kv, rotation=rotation, out=out, limit=limit, max_tokens=max_tokens,
                 ctx=ctx, threads=threads, smooth=smooth, transform=transform, work=work, canary=not no_canary,
                 progress=not quiet, log=_log(quiet), delta=delta)
    for line in export_lines(result.deploy, result.out):
        typer.echo(line)


@command
def verify(
    deployment: Deployment,
    limit: EvalLimit = None,
    max_tokens: ExportMaxTokens = None,
    threads: Threads = None,
    out: VerifyOut = None,
    delta: Delta = None,
    server: VerifyServer = None,
    server_timeout: ServerTimeout = defaults.SERVER_TIMEOUT,
    server_patience: ServerPatience = defaults.SERVER_PATIENCE,
    quiet: Quiet = False,
) -> None:
    """Audit exactly what deploy.json says on held-out prompts and judge it by export's rule: recovery, noise
    floor, memory. Exit 1 unless the deployment is equivalent to f16. With --server, check a running server
    against deploy.json instead."""
    from ..api import verify as run
    from ..api import verify_server
    from ..report.mitigate import server_check_lines, verify_lines

    if server is not None:
        check, files = verify_server(deployment, server, timeout=server_timeout, patience=server_patience, out=out)
        for line in server_check_lines(check):
            typer.echo(line)
        typer.echo(f"reports: {' '.join(map(str, files))}")
        if not check.verified:
            raise typer.Exit(1)
        return
    rep, files = run(deployment, limit=limit, max_tokens=max_tokens, threads=threads, out=out, progress=not quiet,
                     log=_log(quiet), delta=delta)
    for line in verify_lines(rep):
        typer.echo(line)
    typer.echo(f"reports: {' '.join(map(str, files))}")
    if not rep.gate.passed:
        raise typer.Exit(1)


def main() -> None:
    """Exit codes: 0 done, 1 a gate failed, 2 bad input (one line on stderr), 130 interrupted."""
    try:
        app()  # standalone: typer prints its own usage errors and exits 2
    except KvedgeError as exc:
        typer.echo(f"kvedge: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            typer.echo("kvedge: error: disk full; free space and rerun to resume", err=True)
            sys.exit(2)
        raise


__all__ = ["app", "main"]
