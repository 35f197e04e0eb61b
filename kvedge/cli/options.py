"""Every argument and option of the `kvedge` commands, declared once.

Each is a Typer `Annotated` alias; a command names it in its signature and gives the default there
(`lora: Lora = None`). Where two commands take the same flag with different meanings, each meaning has
its own alias with a name that says which (`KvConfigs` are the configs an audit measures, `DeployKv` the
cache you want to run), so a help text never describes another command's option.

Help texts are plain text: Typer renders them with rich markup, so they avoid square brackets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# ---- the model under test -----------------------------------------------------------------------------

_DEFAULT_MODEL = "the embedded SmolLM2-135M-Instruct Q4_1 with the canary safety adapter"

Model = Annotated[Optional[Path], typer.Argument(
    help=f"GGUF model; default: {_DEFAULT_MODEL}.")]
TorchModel = Annotated[Optional[Path], typer.Argument(
    help=f"GGUF model of a llama, mistral3, qwen2, qwen3, phi3 or gemma3 architecture (simulated in torch); default: "
         f"{_DEFAULT_MODEL}.")]
Lora = Annotated[Optional[Path], typer.Option(
    "--lora", help="LoRA adapter GGUF applied on top of the model.")]
NoCanary = Annotated[bool, typer.Option(
    "--no-canary", help="With no MODEL, use the bare default model instead of default model + canary adapter.")]

# ---- llama.cpp runtime ----------------------------------------------------------------------------------

Threads = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads for llama.cpp, and for torch where the command uses it "
                      "(default: $KVEDGE_THREADS, else all cores, at most 8).")]
GpuLayers = Annotated[int, typer.Option(
    "--gpu-layers", help="Layers offloaded to a GPU build (CUDA, Metal); -1 for all.")]
Ctx = Annotated[int, typer.Option(
    "--ctx", help="Context size of the llama.cpp runs (and of the deployment export writes); KV memory is "
                    "reported at it.")]
PassCtx = Annotated[int, typer.Option(
    "--ctx", help="Context of the llama.cpp runs of the calibration pass (tokenization, fidelity check).")]
MaxTokens = Annotated[int, typer.Option(
    "--max-tokens", help="Tokens generated per prompt (greedy).")]
ExportMaxTokens = Annotated[Optional[int], typer.Option(
    "--max-tokens", help="Tokens generated per prompt (greedy; default: the export's).")]
Batch = Annotated[Optional[int], typer.Option(
    "--batch", help="Prompts decoded together (default: chosen from the model's KV size, 16 for small "
                    "models); 1 decodes one prompt at a time.")]

# ---- KV cache configurations ----------------------------------------------------------------------------

KvConfigs = Annotated[Optional[str], typer.Option(
    "--kv", help="KV configs to audit, comma-separated: q8_0 (K and V), k=q8_0/v=q4_0, or per layer "
                 "k=q4_0@11+17+19:q8_0/v=q4_0 (native build). f16 is always run as the reference. "
                 "Default: f16,q8_0,q4_0.")]
DiagnosedKv = Annotated[str, typer.Option(
    "--kv", help="The quantized cache to diagnose: q4_0 (K and V), k=q8_0/v=q4_0, or a per-layer map "
                 "k=q4_0@11+17+19:q8_0/v=q4_0 (native build).")]
HeldKvMap = Annotated[Optional[str], typer.Option(
    "--kv", help="A per-layer map (k=q4_0@11+17+19:q8_0): the layers it names keep their types while the "
                 "others sweep.")]
DeployKv = Annotated[str, typer.Option(
    "--kv", help="The quantized cache you want to deploy: q4_0 (K and V) or k=q8_0/v=q4_0.")]
Rotations = Annotated[Optional[str], typer.Option(
    "--rotation", help="llama.cpp's attention rotation of quantized caches: on (current llama.cpp), off "
                       "(older builds, LLAMA_ATTN_ROT_DISABLE=1), or both (a result for each; the default).")]
DeployRotation = Annotated[str, typer.Option(
    "--rotation", help="Does the runtime you deploy on rotate quantized caches: on (current llama.cpp) or "
                       "off (older builds).")]

# ---- prompts --------------------------------------------------------------------------------------------

Benchmarks = Annotated[str, typer.Option(
    "--benchmarks", help="Bundled prompt sets to run.")]
Split = Annotated[str, typer.Option(
    "--split", help="Split of the bundled sets: eval, calib or train.")]
Prompts = Annotated[Optional[Path], typer.Option(
    "--prompts", help="Your own prompts: CSV/TSV with a header or JSONL; fields prompt (required), id, "
                      "label (harmful|benign), benchmark, category.")]
Limit = Annotated[Optional[int], typer.Option(
    "--limit", help="At most N prompts from each group (advbench, harmbench, xstest-unsafe, xstest-safe, "
                    "or your file's groups).")]
CalibLimit = Annotated[Optional[int], typer.Option(
    "--limit", help="At most N prompts of each group of the calib split (the prompts the choice is made on).")]
EvalLimit = Annotated[Optional[int], typer.Option(
    "--limit", help="At most N prompts of each group of the eval split (held out from the choice).")]
System = Annotated[Optional[str], typer.Option(
    "--system", help="System prompt (default: none, the template's own).")]

# ---- verdicts -------------------------------------------------------------------------------------------

Detector = Annotated[str, typer.Option(
    "--detector", help="Refusal detector: keyword, keyword:PHRASES.txt, judge:JUDGE.gguf or "
                       "judge:JUDGE.gguf@THRESHOLD (judge:default: the default model, a weak stand-in), or "
                       "another registered name, third-party ones included (docs/guides/detectors.md).")]
DetectorPair = Annotated[Optional[list[str]], typer.Option(
    "--detector", help="Twice, to compare two detectors' verdicts on RUN_A's stored answers (e.g. keyword "
                       "and judge:JUDGE.gguf).")]
RefusalPhrases = Annotated[Optional[Path], typer.Option(
    "--refusal-phrases", help="Extend or replace the keyword detector's phrase lists from this file "
                              "(format: docs/guides/detectors.md).")]
FailUnder = Annotated[Optional[float], typer.Option(
    "--fail-under", help="Exit 1 if a quantized config keeps less than this share of the f16 refusal rate "
                         "(e.g. 0.9) and its verdict does not show it equivalent to f16 or moving toward "
                         "refusal: a CI gate.")]
Delta = Annotated[Optional[float], typer.Option(
    "--delta", help="Equivalence margin, in nats, on the mean shift of the first-token refusal margin "
                    "(default: the larger of 0.2 and twice the noise run's own shift bound).")]
Noise = Annotated[str, typer.Option(
    "--noise", help="How the f16 noise-floor run perturbs arithmetic: flash-attn-off, or none to skip it.")]

# ---- servers --------------------------------------------------------------------------------------------

Server = Annotated[Optional[list[str]], typer.Option(
    "--server", metavar="URL", help="Audit a running llama-server, Ollama or OpenAI-compatible endpoint "
                                    "instead (repeatable; servers with the same settings share the work). "
                                    "State what it does not report in the URL: http://host:8080#kv=q4_0,rot=on "
                                    "(see docs/guides/auditing-a-server.md).")]
ServerKv = Annotated[Optional[str], typer.Option(
    "--server-kv", metavar="TYPE", help="KV cache type of the --server endpoints that state none (servers "
                                        "do not report it), e.g. q4_0.")]
VerifyServer = Annotated[Optional[str], typer.Option(
    "--server", metavar="URL", help="Instead of auditing: check what the running server at URL shows of itself "
                                    "against deploy.json (model, context, cache settings, preconditions). Exit 1 "
                                    "unless it shows every one as deploy.json says: an unknown is not a pass.")]
ServerTimeout = Annotated[float, typer.Option(
    "--server-timeout", help="Seconds one server request may take.")]
ServerPatience = Annotated[float, typer.Option(
    "--server-patience", help="Seconds a server may stay unreachable (retried with backoff) before the audit "
                              "stops; rerun to resume.")]

# ---- inputs and outputs ---------------------------------------------------------------------------------

RunDir = Annotated[Path, typer.Argument(
    help="A finished audit directory.")]
RunA = Annotated[Path, typer.Argument(
    help="Audit directory (or its report.json), e.g. the laptop CPU run.")]
RunB = Annotated[Optional[Path], typer.Argument(
    help="Audit directory (or its report.json) of the same model and prompts, e.g. the device GPU run. "
         "Leave out to compare two --detector.")]
Deployment = Annotated[Path, typer.Argument(
    help="A folder written by kvedge export.")]

AuditOut = Annotated[Optional[Path], typer.Option(
    "--out", help="Audit directory (store and reports). Default: kvedge-runs/<model-stem>/")]
RejudgeOut = Annotated[Optional[Path], typer.Option(
    "--out", help="Where the new reports go (default: RUN_DIR/detector-<id>/).")]
CompareOut = Annotated[Optional[Path], typer.Option(
    "--out", help="Directory for compare.json, compare.md, compare.html (default: print only).")]
PcrOut = Annotated[Optional[Path], typer.Option(
    "--out", help="Directory for pcr.json, pcr.md and pcr.html (default: kvedge-runs/<model-stem>/pcr-<kv>/).")]
SweepOut = Annotated[Optional[Path], typer.Option(
    "--out", help="Directory for sweep.json, sweep.md and sweep.html (default: kvedge-runs/<model-stem>/sweep/).")]
DeployOut = Annotated[Path, typer.Option(
    "--out", help="The deployment folder to write (new or empty).")]
VerifyOut = Annotated[Optional[Path], typer.Option(
    "--out", help="Where verify.json, verify.md, verify.html and the stores go (default DEPLOYMENT/verify/).")]
Work = Annotated[Optional[Path], typer.Option(
    "--work", help="Where measurements are kept for resuming (default "
                   "kvedge-runs/<model-stem>/export-<kv>-rot-<on|off>/).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars or messages.")]

# ---- one command each ------------------------------------------------------------------------------------

Bits = Annotated[str, typer.Option(
    "--bits", help="Bit widths of the generic intN group-32 cache: 2-8 or 2,4,8.")]
Smooth = Annotated[str, typer.Option(
    "--smooth", help="Channel smoothing: auto (a candidate when PCR prescribes it and the simulation finds it "
                     "helps), force (a candidate whatever PCR says), only (the smoothed model at the requested "
                     "types is the only candidate), or off.")]
Transform = Annotated[str, typer.Option(
    "--transform", help="kvedge's K transform (centring and per-channel scales of K after RoPE, in the GGUF's "
                        "metadata; applied by kvedge's native llama.cpp only): auto (a candidate when the native "
                        "build exists, the architecture is llama and the simulation finds one that helps; the "
                        "export then runs on the native build), only (the transformed model at the requested types is "
                        "the only candidate, the simulation's best recipe even if it does not help), or off.")]
UseNative = Annotated[bool, typer.Option(
    "--native", help="Load kvedge's native llama.cpp build instead of the stock wheel (what per-layer KV "
                     "configs run on).")]
NoProbe = Annotated[bool, typer.Option(
    "--no-probe", help="Skip the rotation probe (needs no model).")]
AsJson = Annotated[bool, typer.Option(
    "--json", help="Print the findings as JSON.")]
NativeBackend = Annotated[str, typer.Argument(
    help="cpu, cuda or metal.")]
BuildServer = Annotated[bool, typer.Option(
    "--server", help="Also build llama-server from the same patched tree (into the build's bin/; about 15 min "
                     "on 2 cores): the server a K-transform deployment runs on.")]
Force = Annotated[bool, typer.Option(
    "--force", help="Rebuild even if this build exists.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Print the sdist, patch, cache directory and CMake flags; build nothing.")]
Jobs = Annotated[Optional[int], typer.Option(
    "--jobs", "-j", min=1, help="Parallel compile jobs (default: all cores).")]
