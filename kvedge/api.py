"""The library API the CLI calls, usable from a notebook: `kvedge.api.audit(...)` does what
`kvedge audit` does and returns the typed report with the paths it wrote. All validation happens here,
cheapest first and before any model is hashed or run; the CLI only parses and renders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from . import defaults
from .audit import pipeline
from .audit.pipeline import AuditResult
from .audit.spec import MAX_BATCH, AuditSpec, auto_batch
from .canary import canary_adapter_path
from .datasets import parse_benchmarks, select_prompts
from .detectors import Detector, make_detector
from .errors import ExportError, KvedgeError
from .gguf.kvmap import KVConfig
from .gguf.lora import check_adapter
from .gguf.model import ModelInfo, load_model
from .llama import native
from .llama.runtime import (
    LLAMA_CPP,
    RuntimeFactory,
    RuntimeOptions,
    parse_kv,
    parse_kv_list,
    parse_rotation,
)
from .registry import NOISE_VARIANTS
from .report import ReportFiles, write_reports
from .results.compare import CompareResult
from .results.pcr import PcrResult, SweepResult
from .results.verify import ServerCheck, VerifyReport
from .server import parse_servers

Log = Callable[[str], None]


def _adapter_for(info: ModelInfo, model: str | Path | None, lora: str | Path | None, canary: bool) -> Path | None:
    """With no model and no adapter, the default model is audited with the canary (a base that refuses
    nothing has no refusals to lose); `canary=False` audits the bare default model. An adapter is checked
    against the model it is applied to before llama.cpp or torch loads it."""
    if lora is None and model is None and canary:
        lora = canary_adapter_path()
    return check_adapter(lora, info) if lora else None


def _check_fail_under(fail_under: float | None) -> None:
    if fail_under is not None and not 0 <= fail_under <= 1:
        raise KvedgeError(f"--fail-under takes a share between 0 and 1, not {fail_under}")


def _check_delta(delta: float | None) -> None:
    if delta is not None and not (math.isfinite(delta) and 0 < delta <= 10):
        raise KvedgeError(f"--delta is the equivalence margin in nats, above 0 and at most 10, not {delta}")


def _stem(info: ModelInfo, adapter: Path | None) -> str:
    return info.stem + (f"+{adapter.stem}" if adapter else "")


def audit(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str | None = None,
    rotation: str | None = None,
    benchmarks: str = ",".join(defaults.BENCHMARKS),
    split: str = defaults.SPLIT,
    prompts: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int = defaults.MAX_TOKENS,
    ctx: int = defaults.CTX,
    threads: int | None = None,
    gpu_layers: int = 0,
    system: str | None = None,
    noise: str | None = defaults.NOISE,
    out: str | Path | None = None,
    fail_under: float | None = None,
    progress: bool = True,
    detector: str | Detector = defaults.DETECTOR,
    refusal_phrases: str | Path | None = None,
    canary: bool = True,
    batch: int | None = None,
    runtimes: RuntimeFactory = LLAMA_CPP,
    server: Sequence[str] = (),
    server_kv: str | None = None,
    server_timeout: float = defaults.SERVER_TIMEOUT,
    server_patience: float = defaults.SERVER_PATIENCE,
    delta: float | None = None,
) -> AuditResult:
    """With no `model`, audits the embedded default model with the canary adapter; `canary=False`
    audits the bare default model. `detector` is a name (`keyword`, `judge:FILE.gguf`, ...) or a
    detector; `refusal_phrases` extends or replaces the keyword detector's lists; its `final` also ends
    each answer early once the verdict cannot change. `batch` prompts are decoded together (None: chosen
    from the model's KV size; 1: one at a time). `runtimes` is where llama.cpp contexts come from (a test
    can pass a fake). The report's `gate` says whether `fail_under` was met; the CLI turns a miss into
    exit 1.

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
    kv = defaults.KV if kv is None else kv
    rotation = defaults.ROTATION if rotation is None else rotation
    configs = parse_kv_list(kv)
    per_layer = any(c.per_layer for c in configs)
    if per_layer:
        native.check_available()
    parse_rotation(rotation)
    if noise is not None and noise not in NOISE_VARIANTS:
        raise KvedgeError(f"unknown --noise {noise!r}: choose from {', '.join(NOISE_VARIANTS.names())} or none")
    _check_fail_under(fail_under)
    _check_delta(delta)
    _check_counts(max_tokens=max_tokens)
    _check_runtime_flags(ctx, threads, gpu_layers)
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise KvedgeError(f"--batch must be between 1 and {MAX_BATCH}, not {batch}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise KvedgeError(f"--out {out} is a file, not a directory")
    det = make_detector(detector, refusal_phrases)  # a judge model is read now, loaded at its first judgement
    names = parse_benchmarks(benchmarks)
    selected = select_prompts(names, split, limit, prompts)
    info = load_model(model)
    adapter = _adapter_for(info, model, lora, canary)
    configs = list(dict.fromkeys(c.resolve(info) for c in configs))  # resolve checks each fits the model
    if info.k_transform and not per_layer:
        native.check_available(f"{info.path.name} carries kvedge's K transform, which needs")
    if per_layer or info.k_transform:
        native.require_native()  # every config of this audit, the f16 reference too, runs on the native build
    spec = AuditSpec(
        model=info,
        prompts=tuple(selected),
        kv=tuple(configs),
        rotation=rotation,
        lora_path=adapter,
        max_tokens=max_tokens,
        options=RuntimeOptions(n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers),
        system=system,
        out_dir=Path(out) if out else defaults.RUNS_DIR / _stem(info, adapter),
        noise=noise,
        batch=batch or auto_batch(info),
        detector=det,
    )
    return pipeline.run(spec, progress=progress, runtimes=runtimes, fail_under=fail_under,
                        servers=pipeline.ServerOptions(servers, server_timeout, server_patience) if servers else None,
                        own_detector=det is not detector, delta=delta)


def _check_counts(**flags: int | None) -> None:
    """Flags that count something (None: not given) must count at least one."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise KvedgeError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def _check_runtime_flags(ctx: int, threads: int | None, gpu_layers: int) -> None:
    if ctx < 64:
        raise KvedgeError(f"--ctx must be at least 64, not {ctx}")
    _check_counts(threads=threads)
    if gpu_layers < -1:
        raise KvedgeError(f"--gpu-layers takes a count of layers or -1 for all, not {gpu_layers}")


def rejudge(
    run_dir: str | Path,
    detector: str | Detector = "keyword",
    refusal_phrases: str | Path | None = None,
    out: str | Path | None = None,
    fail_under: float | None = None,
    delta: float | None = None,
) -> AuditResult:
    """Judge a finished audit's stored answers with another detector (kvedge rejudge): nothing is
    generated. Writes report.json/.md/.html and attempts.jsonl to `out` (default: `run_dir`/
    `detector-<id>/`), leaving the audit's own reports as they are. `delta` sets the equivalence margin."""
    _check_fail_under(fail_under)
    _check_delta(delta)
    det = make_detector(detector, refusal_phrases)
    return pipeline.rejudge(run_dir, det, det is not detector, out, fail_under, delta)


def compare(
    run_a: str | Path,
    run_b: str | Path | None = None,
    out: str | Path | None = None,
    detectors: Sequence[str | Detector] | None = None,
    delta: float | None = None,
) -> CompareResult:
    """Verdict agreement, per configuration and prompt group, with Wilson intervals (kvedge compare):
    between two audits of one model and its prompts (`run_a`, `run_b`), or between two detectors on one
    audit's stored answers (`run_a`, `detectors=[a, b]`, e.g. `["keyword", "judge:FILE.gguf"]`: nothing
    is generated). Two audits also get a verdict per configuration: is B equivalent to A (`delta`: the
    equivalence margin, default A's). With `out`, compare.json, compare.md and compare.html are written there."""
    from .audit.compare import compare_detectors, compare_runs

    _check_delta(delta)
    if (run_b is None) == (detectors is None):
        raise KvedgeError("compare two audit directories, or one audit directory with two --detector")
    if detectors is None:
        result = compare_runs(run_a, run_b, delta)
    else:
        if len(detectors) != 2:
            raise KvedgeError(f"compare takes two detectors, not {len(detectors)}")
        dets = [make_detector(d) for d in detectors]
        if dets[0].id == dets[1].id:
            raise KvedgeError(f"the two detectors are the same ({dets[0].id})")
        result = compare_detectors(run_a, dets, [d is not spec for d, spec in zip(dets, detectors)])
    if out is not None:
        write_reports(result, Path(out), "compare")
    return result


def _pcr_spec(model, lora, kv: str, rotation: str, ctx: int, threads: int | None, canary: bool,
              map_in_llama_cpp: bool = True, n_benign: int | None = None):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KvedgeError("this command runs a torch pass: install it with pip install 'kvedge[pcr]' "
                          "(CPU torch==2.13.0)") from None
    from .pcr.calibset import N_BENIGN
    from .pcr.run import PcrSpec
    from .gguf.archs import check_architecture

    if n_benign is not None:
        _check_counts(n_benign=n_benign)
    rotations = parse_rotation(rotation)
    config = parse_kv(kv)
    _check_runtime_flags(ctx, threads, 0)
    if not config.quantized:
        raise KvedgeError(f"PCR diagnoses a quantized cache; {config.name} is not one")
    if config.per_layer and map_in_llama_cpp:
        native.check_available()
    info = load_model(model)
    check_architecture(info.architecture)  # before any llama.cpp or torch work
    config = config.resolve(info)  # checks it fits the model
    if config.per_layer and map_in_llama_cpp:
        native.require_native()  # the fidelity check runs the map in llama.cpp
    adapter = _adapter_for(info, model, lora, canary)
    spec = PcrSpec(info, adapter, config, rotations, RuntimeOptions(n_ctx=ctx, n_threads=threads),
                   n_benign=n_benign or N_BENIGN)
    return spec, _stem(info, adapter)


def pcr(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = defaults.PCR_KV,
    rotation: str = defaults.PCR_ROTATION,
    ctx: int = defaults.PCR_CTX,
    threads: int | None = None,
    out: str | Path | None = None,
    canary: bool = True,
    log: Log | None = None,
    n_benign: int | None = None,
) -> tuple[PcrResult, ReportFiles]:
    """The PCR diagnostic (kvedge pcr): returns the result (`kvedge.results.pcr.PcrResult`; its `to_dict()`
    is pcr.json) and the paths of pcr.json/.md/.html. `n_benign`: benign calibration prompts (default 30,
    every XSTest-safe prompt of the calib split; fewer is faster and gives the benign shift a wider interval)."""
    from .pcr.run import run_pcr

    spec, stem = _pcr_spec(model, lora, kv, rotation, ctx, threads, canary, n_benign=n_benign)
    rep = run_pcr(spec, log or (lambda m: None))
    out_dir = Path(out) if out else defaults.RUNS_DIR / stem / f"pcr-{spec.kv.name}"
    return rep, write_reports(rep, out_dir, "pcr")


def prescribed_layer_map(pcr_report: PcrResult | dict[str, Any] | str | Path, rotation: bool = False) -> KVConfig | None:
    """The per-layer KV map a PCR report prescribes for one rotation setting (its `layer_map.chosen`): the
    cheapest map of the ranked layers its simulation predicted safe, chosen on the calib split. None when
    that verdict prescribes no map (none, multi-layer dilution) or no map up to 8 layers was predicted
    safe. `pcr_report` is `pcr(...)[0]`, its `to_dict()`, or a pcr.json path; the result runs as
    `kvedge audit --kv <config.name>` on the native build. Needs no torch."""
    import json

    if isinstance(pcr_report, PcrResult):
        rep = pcr_report
    else:
        rep = PcrResult.from_dict(pcr_report if isinstance(pcr_report, dict) else json.loads(Path(pcr_report).read_text()))
    entry = rep.at(rotation)
    chosen = entry.layer_map.chosen if entry is not None else None
    return parse_kv(chosen.kv) if chosen else None


def sweep(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    rotation: str = defaults.PCR_ROTATION,
    bits: str = defaults.SWEEP_BITS,
    ctx: int = defaults.PCR_CTX,
    threads: int | None = None,
    out: str | Path | None = None,
    canary: bool = True,
    log: Log | None = None,
    kv: str | None = None,
) -> tuple[SweepResult, ReportFiles]:
    """The bit-width sweep (kvedge sweep): returns the result (`kvedge.results.pcr.SweepResult`; its
    `to_dict()` is sweep.json) and the paths of sweep.json/.md/.html.
    With a per-layer `kv` map, the layers it names keep their types while every other layer sweeps (a
    torch-only pass: llama.cpp runs f16 only, so the native build is not needed)."""
    from .pcr.sweep import run_sweep

    widths = parse_bits(bits)
    spec, stem = _pcr_spec(model, lora, kv or "q4_0", rotation, ctx, threads, canary, map_in_llama_cpp=False)
    rep = run_sweep(spec, widths, log or (lambda m: None))
    out_dir = Path(out) if out else defaults.RUNS_DIR / stem / "sweep"
    return rep, write_reports(rep, out_dir, "sweep")


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


def doctor(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    canary: bool = True,
    gpu_layers: int = 0,
    threads: int | None = None,
    use_native: bool = False,
    probe: bool = True,
    runs_dir: str | Path = defaults.RUNS_DIR,
) -> dict[str, Any]:
    """What an audit on this machine would run on (kvedge doctor): the llama.cpp library (stock, or the
    native build with `use_native`), its backends and devices, GPU offload, whether the attention rotation
    is active for each quantized cache type on the model (measured, unless `probe=False`, which also works
    without a model), torch and its device, free disk and memory."""
    from .llama.doctor import diagnose

    if use_native:
        native.require_native()
    info = None
    adapter = None
    if probe:
        info = load_model(model)
        adapter = _adapter_for(info, model, lora, canary)
    options = RuntimeOptions(n_ctx=512, n_threads=threads, n_gpu_layers=gpu_layers)
    return diagnose(info, adapter, options, Path(runs_dir))


def build_native(backend: str = "cpu", force: bool = False, dry_run: bool = False, jobs: int | None = None,
                 server: bool = False) -> int:
    """Build kvedge's native llama.cpp for `backend` (cpu, cuda, metal) with native/build.sh into the
    per-user cache (with `server`, llama-server from the same patched tree too); returns the script's exit
    status. Per-layer KV configs and the K transform need it."""
    return native.build(backend, force=force, dry_run=dry_run, jobs=jobs, server=server)


SMOOTH_MODES = ("auto", "force", "only", "off")


def export(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    kv: str = defaults.EXPORT_KV,
    rotation: str = defaults.EXPORT_ROTATION,
    out: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int = defaults.MAX_TOKENS,
    ctx: int = defaults.CTX,
    threads: int | None = None,
    smooth: str = defaults.SMOOTH,
    transform: str = defaults.TRANSFORM,
    work: str | Path | None = None,
    canary: bool = True,
    progress: bool = True,
    log: Log | None = None,
    delta: float | None = None,
):
    """kvedge export: the deployment the fixed sequence of candidates (from the safest down: more bits for the
    cache PCR names, the smoothed model at `kv`, then `kv` itself) ends on, each candidate judged on the calib
    split by the one verdict function; the last shown equivalent to f16 is written to `out` as deploy.json
    and each runtime's launch files, the f16 cache when none is. `kv` is the unmitigated configuration
    wanted; `rotation` whether the target runtime rotates (on|off); `delta` the equivalence margin (default:
    from the calib noise run). Returns `mitigate.export.ExportResult`."""
    from .io import check_space
    from .mitigate.export import ExportSpec, check_out_dir, run_export
    from .gguf.archs import check_architecture

    config = parse_kv(kv)
    if not config.quantized:
        raise KvedgeError(f"--kv {config.name} is not quantized: nothing to mitigate (f16 is the reference)")
    rotations = parse_rotation(rotation)
    if len(rotations) != 1:
        raise KvedgeError("--rotation for a deployment is on or off: the runtime either rotates or it does not")
    _check_delta(delta)
    if smooth not in SMOOTH_MODES:
        raise KvedgeError(f"--smooth must be one of {', '.join(SMOOTH_MODES)}, not {smooth!r}")
    from .mitigate import ktransform

    if transform not in ktransform.MODES:
        raise KvedgeError(f"--transform must be one of {', '.join(ktransform.MODES)}, not {transform!r}")
    if out is None:
        raise KvedgeError("--out DIR is required: the deployment folder to write")
    _check_counts(limit=limit, max_tokens=max_tokens)
    _check_runtime_flags(ctx, threads, 0)
    out = Path(out)
    check_out_dir(out)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KvedgeError("export diagnoses with a torch pass: install it with pip install 'kvedge[pcr]'") from None
    info = load_model(model)
    check_architecture(info.architecture)
    config = config.resolve(info)  # checks it fits the model
    if transform == "only":
        if smooth == "only":
            raise KvedgeError("--smooth only and --transform only each make their candidate the only one: choose one")
        why = ktransform.unavailable(info)
        if why:
            raise ExportError(f"--transform only: the K transform cannot be a candidate: {why}")
    if config.per_layer or transform == "only" or (transform == "auto" and smooth != "only"
                                                   and ktransform.unavailable(info) is None):
        # the K transform runs on the native build only: every measurement of this export runs there
        native.require_native()
    adapter = _adapter_for(info, model, lora, canary)
    from .mitigate.smooth import UNSMOOTHABLE

    if smooth in ("force", "only") and info.architecture in UNSMOOTHABLE:
        raise ExportError(f"--smooth {smooth}: {info.architecture} cannot be smoothed: {UNSMOOTHABLE[info.architecture]}")
    if smooth != "off":
        # the smoothed copies may land in the deployment folder: room for them before any work
        check_space(out, info.size_bytes + (adapter.stat().st_size if adapter else 0), "the smoothed model", ExportError)
    stem = _stem(info, adapter)
    spec = ExportSpec(
        model=info, adapter=adapter, kv=config, rotation=rotations[0], out=out, delta=delta,
        work=Path(work) if work else defaults.RUNS_DIR / stem / f"export-{config.name.replace('/', '_')}-rot-{rotation}",
        limit=limit, max_tokens=max_tokens, options=RuntimeOptions(n_ctx=ctx, n_threads=threads), smooth=smooth,
        transform=transform,
    )
    return run_export(spec, log or (lambda m: None), progress)


def verify(
    deployment: str | Path,
    limit: int | None = None,
    max_tokens: int | None = None,
    threads: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log: Log | None = None,
    delta: float | None = None,
) -> tuple[VerifyReport, ReportFiles]:
    """kvedge verify: audit exactly what DEPLOY_DIR/deploy.json says on the eval split (all of it unless
    `limit`), beside the unmitigated config and f16, and judge it by the one verdict function at the
    export's equivalence margin (`delta` overrides it). Returns the report (its `gate.passed`: the
    deployment is equivalent; the CLI turns anything else into exit 1) and its files."""
    from .mitigate.verify import VerifySpec, load_deployment, run_verify

    _check_delta(delta)
    _check_counts(limit=limit, max_tokens=max_tokens, threads=threads)
    folder = Path(deployment)
    doc = load_deployment(folder)
    if doc.deployment.launch.k_transform:
        native.check_available("a deployment with kvedge's K transform needs")
        native.require_native()  # the original's audits too: one library for the whole comparison
    out_dir = Path(out) if out else folder / "verify"
    spec = VerifySpec(folder, doc, out_dir, limit, max_tokens or doc.evidence["calib"]["max_tokens"],
                      RuntimeOptions(n_threads=threads), delta)
    rep = run_verify(spec, log or (lambda m: None), progress)
    return rep, write_reports(rep, out_dir, "verify")


def verify_server(
    deployment: str | Path,
    server: str,
    timeout: float = defaults.SERVER_TIMEOUT,
    patience: float = defaults.SERVER_PATIENCE,
    out: str | Path | None = None,
) -> tuple[ServerCheck, ReportFiles]:
    """kvedge verify DEPLOY_DIR --server URL: what the running server shows of itself (model, adapter,
    context, cache settings) against deploy.json, and each precondition it cannot show. `verified` only
    when every item is observed as deploy.json says; an unknown is not a pass. Nothing is audited."""
    from .mitigate.server_check import check_server
    from .mitigate.verify import load_deployment

    if timeout <= 0 or patience < 0:
        raise KvedgeError("--server-timeout must be positive and --server-patience not negative")
    folder = Path(deployment)
    doc = load_deployment(folder)
    check = check_server(doc.deployment, folder, server, timeout, patience)
    out_dir = Path(out) if out else folder / "verify"
    out_dir.mkdir(parents=True, exist_ok=True)
    return check, write_reports(check, out_dir, "server-check")
