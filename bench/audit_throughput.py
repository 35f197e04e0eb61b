"""Audit throughput on the default model: kvedge's default (batched) path, `--batch 1`, and a plain
llama-cpp-python `create_chat_completion` loop over the same prompts, configurations and max tokens,
beside the machine's peak llama.cpp throughput measured in the same run.

    .venv/bin/python bench/audit_throughput.py [--limit 20] [--max-tokens 64] [--split eval]

Each measurement runs in its own child process (its wall time and peak resident memory are its own).
Run it alone: llama.cpp's spinning CPU threads halve each other's speed (and worse) beside any other
llama.cpp or torch process.

The limit ratio is (the tokens kvedge put through the model / peak throughput) / kvedge's wall time:
1.0 would mean every second of the audit ran llama.cpp at its best batched speed. Tokens are counted as
they went through `llama_decode`: prompt rows (prompts, the shared template prefix once per wave) at the
peak prefill rate, answer rows (generated or teacher-forced, one per sequence per step) at the peak
decode rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

DEFAULT_CONFIGS = "f16,q8_0,q4_0"  # the audit's default: with rotation on and off and the noise run, 6 runs


def _peak(threads: int | None) -> dict:
    """Best prefill tok/s (one 512-token decode) and decode tok/s (32 sequences a step) on this machine."""
    import numpy as np

    from kvedge.canary import canary_adapter_path
    from kvedge.gguf.model import load_model
    from kvedge.llama.runtime import F16, Runtime, RuntimeOptions

    model = load_model(None)
    out = {}
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=4096, n_seq=32, n_threads=threads), canary_adapter_path()) as rt:
        d = rt.decoder
        rng = np.random.default_rng(0)
        toks = [int(t) for t in rng.integers(100, 40000, 512)]
        best = 0.0
        for _ in range(3):
            d.clear()
            dt = d._decode([(t, i, 0, i == 511) for i, t in enumerate(toks)])
            best = max(best, 512 / dt)
        out["prefill_tok_s"] = best
        d.clear()
        for s in range(32):  # 32 sequences of 16 prompt tokens, then 48 steps of one token each
            d._decode([(t, i, s, i == 15) for i, t in enumerate(toks[s * 16:(s + 1) * 16])])
        t0 = time.perf_counter()
        for step in range(48):
            d._decode([(toks[step], 16 + step, s, True) for s in range(32)])
        out["decode_tok_s"] = 32 * 48 / (time.perf_counter() - t0)
    return out


def _kvedge(args, batch: int | None) -> dict:
    from kvedge import api
    from kvedge.llama.runtime import LLAMA_CPP

    counts = {"prompt_rows": 0, "answer_rows": 0, "llama_seconds": 0.0}

    class Counting:
        def backend(self, n_gpu_layers):
            return LLAMA_CPP.backend(n_gpu_layers)

        def open(self, *a):
            rt = LLAMA_CPP.open(*a)
            close = rt.close

            def counted_close():
                if rt.decoder is not None:
                    counts["prompt_rows"] += rt.decoder.prompt_rows
                    counts["answer_rows"] += rt.decoder.answer_rows
                    counts["llama_seconds"] += rt.decoder.seconds
                close()

            rt.close = counted_close
            return rt

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = api.audit(kv=DEFAULT_CONFIGS, limit=args.limit, max_tokens=args.max_tokens, split=args.split, out=out,
                        progress=False, batch=batch, threads=args.threads, runtimes=Counting())
        wall = time.perf_counter() - t0
    runs = res.report["runs"]
    return {**counts, "wall": wall, "prompts": res.report["prompts_summary"]["n"], "runs": len(runs),
            "generated_tokens": sum(r["speed"]["decode_tokens"] for r in runs),
            "batch": res.report["settings"]["batch"]}


def _plain(args) -> dict:
    """What a user would write: llama-cpp-python's chat completion, one prompt at a time, per config."""
    from llama_cpp import Llama

    from kvedge.gguf import kvtypes
    from kvedge.canary import canary_adapter_path
    from kvedge.datasets import select_prompts
    from kvedge.gguf.model import load_model
    from kvedge.llama.runtime import _rotation_env, parse_kv_list

    model = load_model(None)
    prompts = select_prompts(split=args.split, limit=args.limit)
    configs = [("f16", True, True), ("f16", True, False)]  # the reference and the flash-attention-off noise run
    configs += [(kv.name, rot, True) for kv in parse_kv_list(DEFAULT_CONFIGS) if kv.quantized for rot in (True, False)]
    tokens = 0
    t0 = time.perf_counter()
    for name, rot, fa in configs:
        with _rotation_env(rot):
            llm = Llama(model_path=str(model.path), lora_path=str(canary_adapter_path()), n_ctx=4096,
                        flash_attn=fa, type_k=int(kvtypes.ggml_type(name)), type_v=int(kvtypes.ggml_type(name)),
                        n_threads=args.threads, verbose=False)
        for p in prompts:
            r = llm.create_chat_completion(messages=[{"role": "user", "content": p.text}], max_tokens=args.max_tokens,
                                           temperature=0.0)
            tokens += r["usage"]["completion_tokens"]
        llm.close()
    return {"wall": time.perf_counter() - t0, "prompts": len(prompts), "runs": len(configs), "generated_tokens": tokens}


def _child(what: str, args) -> None:
    result = {"peak": lambda: _peak(args.threads), "kvedge": lambda: _kvedge(args, None),
              "batch1": lambda: _kvedge(args, 1), "plain": lambda: _plain(args)}[what]()
    print(json.dumps(result))


def _run(what: str, argv: list[str]) -> dict:
    """One measurement in a child process: its result, wall time and peak RSS (MiB)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", what, *argv], stdout=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode()
    if status:
        raise SystemExit(f"{what} failed:\n{out}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--split", default="eval")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--skip", default="", help="comma-separated measurements to skip: batch1, plain")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args)
        return
    argv = ["--limit", str(args.limit), "--max-tokens", str(args.max_tokens), "--split", args.split]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    skip = set(args.skip.split(","))
    peak = _run("peak", argv)
    rows = {"kvedge (default)": _run("kvedge", argv)}
    if "batch1" not in skip:
        rows["kvedge --batch 1"] = _run("batch1", argv)
    if "plain" not in skip:
        rows["create_chat_completion loop"] = _run("plain", argv)

    from kvedge.gguf.model import load_model

    size_mib = load_model(None).size_bytes / 2**20
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"split {args.split}, --limit {args.limit}, max tokens {args.max_tokens}, configs {DEFAULT_CONFIGS} "
          f"(6 runs with rotation on/off and the noise run)")
    print(f"peak llama.cpp throughput: prefill {peak['prefill_tok_s']:.0f} tok/s (one 512-token batch), "
          f"decode {peak['decode_tok_s']:.0f} tok/s (32 sequences a step)")
    print(f"{'path':<30} {'wall':>8} {'prompts/s':>10} {'gen tok/s':>10} {'limit ratio':>12} {'peak RSS':>10}")
    for name, r in rows.items():
        n = r["prompts"] * r["runs"]
        ratio = ""
        if "prompt_rows" in r:
            at_peak = r["prompt_rows"] / peak["prefill_tok_s"] + r["answer_rows"] / peak["decode_tok_s"]
            ratio = f"{at_peak / r['wall']:.2f}"
        print(f"{name:<30} {r['wall']:>7.1f}s {n / r['wall']:>10.2f} {r['generated_tokens'] / r['wall']:>10.1f} "
              f"{ratio:>12} {r['peak_rss_mib']:>7.0f} MiB")
    k = rows["kvedge (default)"]
    print(f"kvedge default: batch {k['batch']}, {k['prompt_rows']} prompt + {k['answer_rows']} answer tokens "
          f"through llama.cpp ({k['llama_seconds']:.1f} s inside llama_decode); model file {size_mib:.0f} MiB, "
          f"peak RSS budget (file + 600 MB) {size_mib + 600 * 1e6 / 2**20:.0f} MiB")
    for name in ("kvedge --batch 1", "create_chat_completion loop"):
        if name in rows:
            print(f"speed-up of the default over {name}: {rows[name]['wall'] / k['wall']:.2f}x")


if __name__ == "__main__":
    main()
