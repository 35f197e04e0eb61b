"""The `kvedge` command: parses, calls the library, renders. No logic of its own."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from ..errors import KvedgeError

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


DETECTOR_HELP = ("Refusal detector: keyword, keyword:PHRASES.txt, judge:JUDGE.gguf[@THRESHOLD] (judge:default: the "
                 "default model, a weak stand-in), or another registered name.")
PHRASES_HELP = "Extend or replace the keyword detector's phrase lists from this file (format: docs/reports.md)."


@command
def audit(
    model: Optional[Path] = typer.Argument(None, help="GGUF model; default: the embedded SmolLM2-135M-Instruct Q4_1 "
                                           "with the canary safety adapter."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LoRA adapter GGUF applied on top of the model."),
    kv: Optional[str] = typer.Option(None, "--kv", help="KV configs, comma-separated: q8_0 (K and V), k=q8_0/v=q4_0, "
                                     "or per layer k=q4_0@11+17+19:q8_0/v=q4_0 (native build). f16 is always run as "
                                     "the reference. Default: f16,q8_0,q4_0."),
    rotation: Optional[str] = typer.Option(None, "--rotation", help="Attention rotation of quantized caches: on (current "
                                           "llama.cpp), off (older builds), both (the default)."),
    benchmarks: str = typer.Option("advbench,harmbench,xstest", "--benchmarks", help="Bundled prompt sets to run."),
    split: str = typer.Option("eval", "--split", help="Split of the bundled sets: eval, calib or train."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Your own prompts: CSV/TSV with a header or JSONL; "
                                           "fields prompt (required), id, label (harmful|benign), benchmark, category."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N prompts from each group (advbench, harmbench, "
                                        "xstest-unsafe, xstest-safe, or your file's groups)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens generated per prompt (greedy)."),
    ctx: int = typer.Option(4096, "--ctx", help="Context size: the runtime's, and the one memory is reported at."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: $KVEDGE_THREADS, else all cores, at most 8)."),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers offloaded to a GPU build (CUDA, Metal); -1 for all."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: none, the template's own)."),
    noise: str = typer.Option("flash-attn-off", "--noise", help="How the f16 noise-floor run perturbs arithmetic: "
                              "flash-attn-off, or none to skip it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Audit directory (store and reports). "
                                       "Default: kvedge-runs/<model-stem>/"),
    fail_under: Optional[float] = typer.Option(None, "--fail-under", help="Exit 1 if any config keeps less than this "
                                               "share of the f16 refusal rate (e.g. 0.9)."),
    no_canary: bool = typer.Option(False, "--no-canary", help="With no MODEL, audit the bare default model "
                                   "instead of default model + canary adapter."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Prompts decoded together (default: chosen from the "
                                        "model's KV size, 16 for small models); 1 decodes one prompt at a time."),
    detector: str = typer.Option("keyword", "--detector", help=DETECTOR_HELP),
    refusal_phrases: Optional[Path] = typer.Option(None, "--refusal-phrases", help=PHRASES_HELP),
    server: Optional[list[str]] = typer.Option(None, "--server", metavar="URL", help="Audit a running llama-server, Ollama or "
                                               "OpenAI-compatible endpoint instead (repeatable; servers with the same "
                                               "settings share the work). State what it does not report in the URL: "
                                               "http://host:8080#kv=q4_0,rot=on (see docs/server.md)."),
    server_kv: Optional[str] = typer.Option(None, "--server-kv", metavar="TYPE", help="KV cache type of the --server endpoints that "
                                            "state none (servers do not report it), e.g. q4_0."),
    server_timeout: float = typer.Option(300.0, "--server-timeout", help="Seconds one server request may take."),
    server_patience: float = typer.Option(120.0, "--server-patience", help="Seconds a server may stay unreachable "
                                          "(retried with backoff) before the audit stops; rerun to resume."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run refusal benchmarks through real llama.cpp at each KV cache type and report what quantization costs."""
    from ..api import audit as run

    result = run(
        model=model, lora=lora, kv=kv, rotation=rotation, benchmarks=benchmarks, split=split, prompts=prompts,
        limit=limit, max_tokens=max_tokens, ctx=ctx, threads=threads, gpu_layers=gpu_layers, system=system,
        noise=None if noise == "none" else noise, out=out, fail_under=fail_under, progress=not quiet,
        canary=not no_canary, batch=batch, detector=detector, refusal_phrases=refusal_phrases,
        server=server or (), server_kv=server_kv, server_timeout=server_timeout, server_patience=server_patience,
    )
    _echo_audit(result)


def _echo_audit(result) -> None:
    from ..report.audit import render_table
    from ..report.server import server_summary

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
    run_dir: Path = typer.Argument(..., help="A finished audit directory."),
    detector: str = typer.Option("keyword", "--detector", help=DETECTOR_HELP),
    refusal_phrases: Optional[Path] = typer.Option(None, "--refusal-phrases", help=PHRASES_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Where the new reports go (default: "
                                       "RUN_DIR/detector-<id>/)."),
    fail_under: Optional[float] = typer.Option(None, "--fail-under", help="Exit 1 if any config keeps less than this "
                                               "share of the f16 refusal rate."),
) -> None:
    """Judge an audit's stored answers with another detector: nothing is generated."""
    from ..api import rejudge as run

    result = run(run_dir, detector=detector, refusal_phrases=refusal_phrases, out=out, fail_under=fail_under)
    cut_by = result.report.settings.stop_when_final
    if cut_by and cut_by != result.report.detector.id:
        # the answers end where the audit's detector could decide; another detector sees only that opening
        typer.echo(f"note: the audit ended answers once {cut_by} could decide them, so {result.report.detector.id} "
                   f"judges their openings; for whole answers audit with --detector {detector}", err=True)
    _echo_audit(result)


@command
def compare(
    run_a: Path = typer.Argument(..., help="Audit directory (or its report.json), e.g. the laptop CPU run."),
    run_b: Optional[Path] = typer.Argument(None, help="Audit directory (or its report.json) of the same model and "
                                           "prompts, e.g. the device GPU run. Leave out to compare two --detector."),
    detector: Optional[list[str]] = typer.Option(None, "--detector", help="Twice, to compare two detectors' verdicts "
                                                 "on RUN_A's stored answers (e.g. keyword and judge:JUDGE.gguf)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for compare.json, compare.md, compare.html."),
) -> None:
    """Verdict agreement: two audits of one model and its prompts (say, CPU vs CUDA), or two detectors on one audit."""
    from ..api import compare as run
    from ..report.compare import render_comparison

    typer.echo(render_comparison(run(run_a, run_b, out, detectors=detector or None)))
    if out is not None:
        typer.echo(f"reports: {out / 'compare.json'} {out / 'compare.md'} {out / 'compare.html'}")


def _log(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            typer.echo(f"kvedge: {message}", err=True)
    return log


@command
def pcr(
    model: Optional[Path] = typer.Argument(None, help="GGUF model (llama, qwen2, qwen3); default: the embedded "
                                           "SmolLM2-135M-Instruct with the canary adapter."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LoRA adapter GGUF applied on top of the model."),
    kv: str = typer.Option("q4_0", "--kv", help="The cache to diagnose: q4_0 (K and V), k=q8_0/v=q4_0, or a per-layer "
                           "map k=q4_0@11+17+19:q8_0/v=q4_0 (native build)."),
    rotation: str = typer.Option("both", "--rotation", help="Does the target runtime rotate the cache: on (current "
                                 "llama.cpp), off (older builds), both (a verdict for each)."),
    ctx: int = typer.Option(2048, "--ctx", help="Context of the llama.cpp runs (fidelity check)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for llama.cpp and torch."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for pcr.json, pcr.md and pcr.html "
                                       "(default: kvedge-runs/<model-stem>/pcr-<kv>/)."),
    no_canary: bool = typer.Option(False, "--no-canary", help="With no MODEL, diagnose the bare default model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
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
    model: Optional[Path] = typer.Argument(None, help="GGUF model; default: SmolLM2-135M-Instruct + canary adapter."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LoRA adapter GGUF applied on top of the model."),
    bits: str = typer.Option("2-8", "--bits", help="Bit widths of the generic intN group-32 cache: 2-8 or 2,4,8."),
    kv: Optional[str] = typer.Option(None, "--kv", help="A per-layer map (k=q4_0@11+17+19:q8_0): the layers it names "
                                     "keep their types while the others sweep."),
    rotation: str = typer.Option("both", "--rotation", help="on, off or both."),
    ctx: int = typer.Option(2048, "--ctx", help="Context of the llama.cpp tokenization pass."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for sweep.json, sweep.md and sweep.html."),
    no_canary: bool = typer.Option(False, "--no-canary", help="With no MODEL, sweep the bare default model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
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
    model: Optional[Path] = typer.Argument(None, help="GGUF model for the rotation probe; default: the embedded "
                                           "SmolLM2-135M-Instruct with the canary adapter."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LoRA adapter GGUF applied on top of the model."),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers offloaded to a GPU build, as the audit would."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    use_native: bool = typer.Option(False, "--native", help="Load kvedge's native llama.cpp build instead of the "
                                    "stock wheel (what per-layer KV configs run on)."),
    no_probe: bool = typer.Option(False, "--no-probe", help="Skip the rotation probe (needs no model)."),
    no_canary: bool = typer.Option(False, "--no-canary", help="With no MODEL, probe the bare default model."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
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
    backend: str = typer.Argument("cpu", help="cpu, cuda or metal."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if this build exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the sdist, patch, cache directory and CMake flags; "
                                 "build nothing."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel compile jobs (default: all cores)."),
) -> None:
    """Build kvedge's native llama.cpp (per-layer KV cache types) from the llama-cpp-python sdist, once per user."""
    from ..api import build_native as run

    code = run(backend, force=force, dry_run=dry_run, jobs=jobs)
    if code:
        raise typer.Exit(code)


@command
def export(
    model: Optional[Path] = typer.Argument(None, help="GGUF model; default: SmolLM2-135M-Instruct + canary adapter."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="LoRA adapter GGUF applied on top of the model."),
    kv: str = typer.Option("q4_0", "--kv", help="The cache you want to run: q4_0 (K and V) or k=q8_0/v=q4_0."),
    rotation: str = typer.Option("on", "--rotation", help="Does the target runtime rotate quantized caches: on "
                                 "(current llama.cpp) or off (older builds)."),
    target: str = typer.Option("noise", "--target", help="noise (flips within the f16 noise floor) or a retention "
                               "R in 0..1 of f16's refusals and answers."),
    out: Path = typer.Option(..., "--out", help="The deployment folder to write (new or empty)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N calib prompts of each group."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens generated per prompt (greedy)."),
    ctx: int = typer.Option(4096, "--ctx", help="The deployment's context size (KV memory is reported at it)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for llama.cpp and torch."),
    smooth: str = typer.Option("auto", "--smooth", help="Channel smoothing: auto (when PCR prescribes it and the "
                               "simulation finds it helps), force, or off."),
    work: Optional[Path] = typer.Option(None, "--work", help="Where measurements are kept for resuming (default "
                                        "kvedge-runs/<model-stem>/export-<kv>-rot-<on|off>/)."),
    no_canary: bool = typer.Option(False, "--no-canary", help="With no MODEL, export the bare default model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
) -> None:
    """Choose the smallest KV configuration that stays safe (on the calib split) and write it for each runtime."""
    from ..api import export as run
    from ..report.mitigate import export_lines

    result = run(model=model, lora=lora, kv=kv, rotation=rotation, target=target, out=out, limit=limit,
                 max_tokens=max_tokens, ctx=ctx, threads=threads, smooth=smooth, work=work, canary=not no_canary,
                 progress=not quiet, log=_log(quiet))
    for line in export_lines(result.deploy, result.out):
        typer.echo(line)


@command
def verify(
    deployment: Path = typer.Argument(..., help="A folder written by kvedge export."),
    target: Optional[str] = typer.Option(None, "--target", help="Judge against this target instead of the "
                                         "export's: noise or a retention R in 0..1."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N eval prompts of each group."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Tokens per prompt (default: the export's)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where verify.json, verify.md, verify.html and the stores go "
                                       "(default DEPLOYMENT/verify/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
) -> None:
    """Audit exactly what deploy.json says on held-out prompts: recovery, noise floor, memory. Exit 1 on a miss."""
    from ..api import verify as run
    from ..report.mitigate import verify_lines

    rep, files = run(deployment, target=target, limit=limit, max_tokens=max_tokens, threads=threads, out=out,
                      progress=not quiet, log=_log(quiet))
    for line in verify_lines(rep):
        typer.echo(line)
    typer.echo(f"reports: {' '.join(map(str, files))}")
    if not rep["gate"]["passed"]:
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
