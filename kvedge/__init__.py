"""kvedge: does quantizing the llama.cpp KV cache silently break a GGUF model's refusals?"""

__version__ = "0.2.0"
