"""Which changes of llama.cpp settings really change arithmetic, and do their verdict flips stay within
the noise floor? Prints, for each variant of the f16 runtime, the largest |d logprob| against the
reference and its verdict flips judged by `kvedge.audit.noise.judge` against the flash-attention-off noise run
(the audit's own yardstick). Any future change of arithmetic, such as batched generation, belongs here.

    .venv/bin/python bench/arithmetic_noise.py [--limit 10] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from kvedge.gguf.model import load_model
from kvedge.llama.runtime import F16
from kvedge.gguf.template import chat_template_for
from kvedge.datasets import select_prompts
from kvedge.detectors import default_detector
from kvedge.audit.noise import flips, judge
from kvedge.llama.runtime import Runtime, RuntimeOptions


def run_variant(model, prompts, opts: RuntimeOptions, max_tokens: int):
    tpl, det = chat_template_for(model), default_detector()
    verdicts, lasts = [], []
    t0 = time.perf_counter()
    with Runtime(model, F16, True, opts) as rt:
        for p in prompts:
            toks = rt.tokenize(tpl.render(p.text))
            lasts.append(next(rt.score(toks, [0])))
            g = rt.generate(toks, max_tokens)
            verdicts.append(det.detect(p.text, g.text).refused)
    return verdicts, lasts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model = load_model(None)
    prompts = select_prompts(limit=args.limit)
    base = RuntimeOptions(n_ctx=2048)
    variants = {
        "reference (flash on, threads auto)": base,
        "threads=1": dataclasses.replace(base, n_threads=1),
        "n_batch=n_ubatch=8": dataclasses.replace(base, n_batch=8, n_ubatch=8),
        "flash-attn-off (the audit's noise run)": dataclasses.replace(base, flash_attn=False),
    }
    results = {name: run_variant(model, prompts, o, args.max_tokens) for name, o in variants.items()}
    ref_v, ref_l, _ = results["reference (flash on, threads auto)"]
    noise = flips(ref_v, results["flash-attn-off (the audit's noise run)"][0])
    print(f"{len(prompts)} prompts, {args.max_tokens} tokens, model {model.name}")
    print(f"{'variant':<40} {'max|dlogp|':>11} {'flips -/+':>10} {'vs noise':>16} {'seconds':>8}")
    for name, (v, lasts, secs) in results.items():
        d = max(float(np.abs(a - b).max()) for a, b in zip(ref_l, lasts))
        f = flips(ref_v, v)
        print(f"{name:<40} {d:>11.3g} {f'-{f.lost}/+{f.gained}':>10} {judge(f, noise).verdict:>16} {secs:>8.1f}")


if __name__ == "__main__":
    main()
