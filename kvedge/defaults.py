"""Every default a user can meet, in one place: the library API, the CLI and the pipeline read them here,
so a default changed here changes everywhere at once (and the generated command reference shows it)."""

from __future__ import annotations

from pathlib import Path

RUNS_DIR = Path("kvedge-runs")  # where audits, PCR runs and export work folders go unless --out says

# audit
KV = "f16,q8_0,q4_0"  # the configs audited; f16 is always run as the reference
ROTATION = "both"  # llama.cpp's attention rotation: on, off or both
BENCHMARKS = ("advbench", "harmbench", "xstest", "orbench", "coconot")
SPLIT = "eval"  # audits report on eval; choices are made on calib
MAX_TOKENS = 64  # greedy tokens per answer
CTX = 4096  # the context an audit runs with, and the one KV memory is reported at
NOISE = "flash-attn-off"  # the f16 noise run's change of arithmetic (kvedge.audit.noise)
DETECTOR = "keyword"

# servers
SERVER_TIMEOUT = 300.0  # seconds one request may take (a long answer on a slow device)
SERVER_PATIENCE = 120.0  # seconds a server may stay unreachable (restarting) before it is given up

# pcr, sweep
PCR_KV = "q4_0"
PCR_ROTATION = "both"
PCR_CTX = 2048  # context of PCR's llama.cpp pass (its calibration prompts are short)
SWEEP_BITS = "2-8"

# export, verify
EXPORT_KV = "q4_0"
EXPORT_ROTATION = "on"  # current llama.cpp rotates quantized caches
SMOOTH = "auto"
TRANSFORM = "auto"  # export's K-transform candidate: auto | off
