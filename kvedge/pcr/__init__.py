"""Per-Channel Reduction (PCR): why a model loses refusals (or gains over-refusals) under KV-cache
quantization, and which fix will work, from 10 harmful and 30 benign calibration prompts measured apart
(definitions and choices: docs/pcr.md).

calibset (llama.cpp: tokens, continuations, margin tokens) -> engine (torch runs under cache plans)
-> stats (pure statistics) -> classify (verdict, prescription) -> report; fidelity measures the torch
simulation against llama.cpp in the same run, and sweep traces the bit-width curve.
"""
