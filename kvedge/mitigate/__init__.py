"""The mitigation: from a diagnosis to a deployment that is small and still safe (`kvedge export`), and
the proof on held-out prompts (`kvedge verify`). Definitions and choices: docs/mitigation.md; the
deployment file: docs/deploy-schema.md.

- `smooth`: channel smoothing, the exact reparametrisation (power-of-two scales per cache channel)
- `simulate`: its scales, chosen on the calibration prompts in the torch simulation of the cache
- `gguf_patch`: the patched model and adapter, written with gguf-py, every other byte carried over
- `selfcheck`: the patched files at f16 KV against the original, through llama.cpp, against the noise floor
- `candidates`, `choose`: what export considers and how it picks (calib split only)
- `deploy`: deploy.json and the same deployment in each runtime's own syntax, with parsers to read them back
- `export`, `verify`: the two commands' work
"""
