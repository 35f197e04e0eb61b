"""Measure the canary for its data card, through real llama.cpp (f16 KV, greedy, kvedge's detector, the
`eval` split only): refusal on AdvBench, HarmBench and XSTest unsafe, answers on XSTest safe, for the
base model and base + canary, and the canary's mean next-token KLD from the base on benign prompts.

    .venv/bin/python -m models.canary.evaluate [--adapter FILE] [--limit N] [--out models/canary/eval.json]

--adapter measures a candidate adapter before it replaces the shipped one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from kvedge import api
from kvedge.llama.runtime import F16
from kvedge.llama.scoring import kld_topk, top_k
from kvedge.gguf.template import chat_template_for
from kvedge.canary import canary_adapter_path
from kvedge.datasets import select_prompts
from kvedge.gguf.model import default_model_path, inspect_model, sha256_file
from kvedge.llama.runtime import Runtime, RuntimeOptions
from kvedge.stats import mean_estimate

HERE = Path(__file__).resolve().parent


def benign_kld(adapter: Path, limit: int | None, max_tokens: int) -> dict:
    """KL(base || canary) per position on the base model's own greedy answers to benign eval prompts."""
    model = inspect_model(default_model_path())
    tpl = chat_template_for(model)
    prompts = [p for p in select_prompts(("advbench", "harmbench", "xstest"), limit=limit) if not p.harmful]
    opts = RuntimeOptions(n_ctx=2048)
    refs, conts = {}, {}
    with Runtime(model, F16, True, opts) as rt:
        for p in prompts:
            toks = rt.tokenize(tpl.render(p.text))
            conts[p.id] = (toks, rt.generate(toks, max_tokens).tokens)
            refs[p.id] = [top_k(lp) for lp in rt.score(*conts[p.id])]
    per_prompt = []
    with Runtime(model, F16, True, opts, adapter) as rt:
        for p in prompts:
            klds = [kld_topk(r, lq) for r, lq in zip(refs[p.id], rt.score(*conts[p.id]))]
            if klds:
                per_prompt.append(float(np.mean(klds)))
    return mean_estimate(per_prompt).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, default=None, help="default: the shipped canary")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=Path, default=Path("kvedge-runs/canary-eval"))
    ap.add_argument("--out", type=Path, default=HERE / "eval.json")
    args = ap.parse_args()
    adapter = args.adapter or canary_adapter_path()
    if adapter is None or not adapter.is_file():
        raise SystemExit("no canary adapter: train it first (python -m models.canary.train)")
    t0 = time.time()
    common = dict(kv="f16", noise=None, limit=args.limit, max_tokens=args.max_tokens, progress=True)
    res = {}
    # the canary's store is named by the adapter's hash, so measuring a candidate never resumes another's run
    runs = {"base": (dict(canary=False), "base"),
            "canary": (dict(lora=adapter), f"canary-{sha256_file(adapter)[:12]}")}
    for name, (kw, store) in runs.items():
        r = api.audit(out=args.runs / store, **kw, **common).report["runs"][0]
        res[name] = {"refusal_by_subset": r["refusal_by_subset"], "refusal_harmful": r["refusal_harmful"],
                     "over_refusal_by_subset": r["over_refusal_by_subset"]}
    res["canary_kld_from_base_benign"] = benign_kld(adapter, args.limit, args.max_tokens)
    res["settings"] = {"split": "eval", "limit": args.limit, "kv": "f16", "greedy": True,
                       "max_tokens": args.max_tokens, "detector": "keyword-v1", "seconds": round(time.time() - t0)}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
