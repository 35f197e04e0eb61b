"""llama.cpp through llama-cpp-python: a context per configuration (`runtime`), kvedge's batched greedy
decoder (`decode`), distances between next-token distributions (`scoring`), kvedge's native build with
per-layer cache types (`native`), and the doctor's look at the local build (`doctor`)."""
