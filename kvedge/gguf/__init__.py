"""A GGUF on disk: its header walked with bounded reads (`header`), the model it describes (`model`,
read with gguf-py), LoRA adapters checked against it (`lora`), its chat template rendered in a sandbox
(`template`), the KV cache types (`kvtypes`) and per-layer maps (`kvmap`) it can run with, and the architectures
kvedge's torch pass reproduces (`archs`)."""
