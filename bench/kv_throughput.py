"""Decode and prompt throughput and KV memory per cache type on the default model (or MODEL).

    .venv/bin/python bench/kv_throughput.py [MODEL.gguf] [--kv f16,q8_0,q4_0] [--prompts 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import platform

from kvedge.gguf.model import load_model
from kvedge.gguf.template import chat_template_for
from kvedge.datasets import select_prompts
from kvedge.llama.runtime import Runtime, RuntimeOptions, parse_kv_list


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--kv", default="f16,q8_0,q4_0")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    model = load_model(args.model)
    tpl = chat_template_for(model)
    prompts = [p for p in select_prompts(limit=args.prompts) if not p.harmful][: args.prompts]
    print(f"model {model.name} ({model.file_type}); {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'kv':<16} {'decode tok/s':>12} {'prompt tok/s':>12} {'KV bytes/tok':>12} {'MiB @ctx':>9}")
    for kv in parse_kv_list(args.kv):
        dec_t = dec_n = pp_t = pp_n = 0.0
        with Runtime(model, kv, True, RuntimeOptions(n_ctx=args.ctx)) as rt:
            for p in prompts:
                g = rt.generate(rt.tokenize(tpl.render(p.text)), args.tokens)
                dec_t, dec_n = dec_t + g.decode_seconds, dec_n + len(g.tokens)
                pp_t, pp_n = pp_t + g.prompt_seconds, pp_n + g.n_prompt_tokens
        bpt = kv.bytes_per_token(model)
        print(f"{kv.name:<16} {dec_n / dec_t:>12.1f} {pp_n / pp_t:>12.1f} {bpt:>12} {bpt * args.ctx / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
