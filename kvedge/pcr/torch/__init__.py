"""Torch side of kvedge: a float32 forward over a GGUF's own weights (`gguf_torch`) and a fake
quantizer that reproduces llama.cpp's KV-cache storage, attention rotation included (`kvquant`).

Submodules import torch; this package itself does not, so `import kvedge.pcr.torch` is cheap.
"""
