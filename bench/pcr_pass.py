"""Wall time and peak memory of the PCR pass (`kvedge pcr`) on the default model + canary, or MODEL.

    .venv/bin/python bench/pcr_pass.py [MODEL.gguf] [--kv q4_0] [--rotation both] [--threads N]

Runs the pass in this process (as `kvedge pcr` does) and prints the phases the report times, the
process's peak resident memory, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--kv", default="q4_0")
    ap.add_argument("--rotation", default="both")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    from kvedge.api import pcr

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        rep, _ = pcr(model=args.model, kv=args.kv, rotation=args.rotation, threads=args.threads, out=out,
                        log=lambda m: print(f"[{time.perf_counter() - t0:6.1f} s] {m}", flush=True))
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = rep.timing
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"model: {os.path.basename(rep.model.path)} + {os.path.basename(rep.adapter or 'no adapter')}; "
          f"kv {args.kv}, rotation {args.rotation}")
    print(f"wall (incl. imports after start): {wall:.1f} s; pass: {t.seconds:.1f} s "
          f"(llama.cpp {t.llama_cpp_seconds:.1f} s, torch load {t.load_seconds:.1f} s, "
          f"{t.torch_runs} torch runs on {t.threads} threads)")
    print(f"peak resident memory: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
