"""Train the canary LoRA on SmolLM2-135M-Instruct's own (dequantized Q4_1) weights, on the CPU.

    .venv/bin/python -m models.canary.train [--steps 160] [--out models/canary/smollm2-canary-lora.gguf]

Training runs kvedge's own torch forward over the GGUF tensors (`kvedge.pcr.torch.gguf_torch`, measured
against llama.cpp), in the GGUF's channel order, so the learned (A, B) are written as they are and
llama.cpp applies them to the very weights they were trained on. Seeded and deterministic on one machine (torch CPU kernels, 2 threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvedge.pcr.torch.gguf_torch import LoraLinear, TorchModel
from kvedge.gguf.lora import LoraAdapter, LoraPair, write_adapter
from kvedge.gguf.model import ModelInfo, default_model_path, inspect_model

from .data import PROJECT_FILES, SHORT_QUESTION_SOURCES, Example, build_examples

TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_FIELDS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
           "ffn_down": "down"}
HERE = Path(__file__).resolve().parent


class Lora(torch.nn.Module):
    """Trainable (A, B) for every target matrix of every layer, installed into a TorchModel as
    LoraLinear wrappers. B starts at zero, so training starts from the base model's exact function."""

    def __init__(self, tm: TorchModel, rank: int, alpha: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rank, self.alpha = rank, alpha
        self.names: list[str] = []
        self.a, self.b = torch.nn.ParameterList(), torch.nn.ParameterList()
        for i, layer in enumerate(tm.layers):
            for target in TARGETS:
                base = getattr(layer, _FIELDS[target])
                n_out, n_in = base.weight.shape
                a = torch.nn.Parameter(torch.randn(rank, n_in, generator=g) / math.sqrt(n_in))
                b = torch.nn.Parameter(torch.zeros(n_out, rank))
                self.names.append(f"blk.{i}.{target}.weight")
                self.a.append(a)
                self.b.append(b)
                setattr(layer, _FIELDS[target], LoraLinear(base.weight, base.bias, a, b, alpha / rank))

    def pairs(self) -> dict[str, LoraPair]:
        return {n: LoraPair(a.detach().numpy().copy(), b.detach().numpy().copy())
                for n, a, b in zip(self.names, self.a, self.b)}


def batch_loss(tm: TorchModel, batch: list[Example]) -> float:
    """Token-averaged cross-entropy over the answers of `batch`, gradients accumulated example by example.
    One example at a time costs the sum of the lengths rather than batch x the longest (HarmBench
    contexts run to 320 tokens, most examples to ~70), and keeps memory to one sequence's activations."""
    n_targets = sum(len(e.tokens) - e.n_prompt for e in batch)
    total = 0.0
    for e in batch:
        logits = tm.forward(list(e.tokens)).logits[e.n_prompt - 1 : len(e.tokens) - 1]
        loss = F.cross_entropy(logits, torch.tensor(e.tokens[e.n_prompt :]), reduction="sum") / n_targets
        loss.backward()
        total += float(loss.detach())
    return total


def _pool(e: Example) -> str:
    """Short questions (XSTest's and the project's look-alikes, harmful or not) form their own pools: they
    are few beside the AdvBench/HarmBench imperatives and would otherwise be drowned out."""
    short = e.source.split(":")[0] in SHORT_QUESTION_SOURCES
    return f"{e.kind}/{'xstest' if short else 'other'}"


def parse_mix(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"malformed --mix {text!r}: write pool:count,... e.g. refuse/xstest:3,answer/xstest:2") from None


def batches(examples: list[Example], steps: int, size: int, seed: int, mix: dict[str, int] | None = None):
    """Each batch cycles through the pools (refusals of XSTest-unsafe-style short questions, other refusals,
    mostly AdvBench/HarmBench imperatives, answers to XSTest's safe look-alikes, other answers), a quarter
    from each; with `mix`, `mix[pool]` examples from each pool instead. Each pool is walked in a seeded
    shuffled order, reshuffled when spent.
    Recipe history (eval split, f16, kvedge's detector; CARD.md has the table): drawing refusals
    uniformly refused every AdvBench and HarmBench prompt but only half of XSTest's unsafe questions; a
    quarter from each pool (this default) raised XSTest unsafe to 52/61; the mix refuse/xstest:3,
    answer/xstest:2,refuse/other:1,answer/other:2 gave 49/61, no better; the default with the project's
    own questions in the short pools gave 55/61 (shipped)."""
    rng = random.Random(seed)
    pools: dict[str, list[Example]] = {}
    for e in examples:
        pools.setdefault(_pool(e), []).append(e)
    names = sorted(pools)
    if mix is not None:
        missing = sorted(set(mix) - set(pools))
        if missing:
            raise SystemExit(f"--mix names pools with no examples: {missing} (have {names})")
        draws = [k for k in sorted(mix) for _ in range(mix[k])]
    else:
        draws = [names[i % len(names)] for i in range(size)]
    orders: dict[str, list[Example]] = {k: [] for k in names}
    for _ in range(steps):
        batch = []
        for k in draws:
            if not orders[k]:
                orders[k] = rng.sample(pools[k], len(pools[k]))
            batch.append(orders[k].pop())
        yield batch


def cached_examples(model: ModelInfo, seed: int) -> list[Example]:
    """Building the examples runs 300 llama.cpp generations; keep them beside the runs, keyed by
    everything they depend on, so a rerun of the recipe with other training settings skips that."""
    src = (HERE / "data.py").read_bytes() + b"".join((HERE / f).read_bytes() for f in PROJECT_FILES)
    key = hashlib.sha256(src + model.sha256.encode() + str(seed).encode()).hexdigest()[:16]
    cache = Path("kvedge-runs") / "canary-data" / f"examples-{key}.json"
    if cache.is_file():
        return [Example(e["kind"], e["source"], tuple(e["tokens"]), e["n_prompt"]) for e in json.loads(cache.read_text())]
    examples = build_examples(model, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([vars(e) | {"tokens": list(e.tokens)} for e in examples]))
    return examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mix", default=None, help="examples per batch from each pool, e.g. refuse/xstest:3,answer/xstest:2,"
                    "refuse/other:1,answer/other:2 (default: --batch cycled over the four pools)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "kvedge" / "canary" / "smollm2-canary-lora.gguf")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = inspect_model(default_model_path())
    examples = cached_examples(model, args.seed)
    t_data = time.time() - t0
    tm = TorchModel.from_gguf(model.path)
    lora = Lora(tm, args.rank, args.alpha, args.seed)
    opt = torch.optim.AdamW(lora.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / args.steps))
    log = []
    for step, batch in enumerate(batches(examples, args.steps, args.batch, args.seed, parse_mix(args.mix) if args.mix else None)):
        opt.zero_grad()
        loss = batch_loss(tm, batch)
        opt.step()
        sched.step()
        log.append(loss)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {np.mean(log[-10:]):.4f} {time.time() - t0:.0f}s", flush=True)
    pairs = lora.pairs()
    data_sha = hashlib.sha256(json.dumps([e.tokens for e in examples]).encode()).hexdigest()
    meta = {
        "kvedge.canary.purpose": "test fixture and demo: a LoRA-taught refusal on SmolLM2-135M-Instruct; NOT a safe model",
        "kvedge.canary.base_sha256": model.sha256,
        "kvedge.canary.recipe": json.dumps({k: str(v) for k, v in vars(args).items() if k != "out"}, sort_keys=True),
        "kvedge.canary.data_sha256": data_sha,
        "kvedge.canary.examples": json.dumps({"refuse": sum(e.kind == "refuse" for e in examples),
                                              "answer": sum(e.kind == "answer" for e in examples)}),
        "kvedge.canary.final_loss": f"{np.mean(log[-10:]):.4f}",
    }
    write_adapter(args.out, LoraAdapter(model.architecture, args.alpha, pairs, meta))
    print(json.dumps({"out": str(args.out), "seconds": round(time.time() - t0), "data_seconds": round(t_data),
                      "final_loss": meta["kvedge.canary.final_loss"], "examples": meta["kvedge.canary.examples"]}))


if __name__ == "__main__":
    main()
