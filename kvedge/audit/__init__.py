"""The audit pipeline: prompts x llama.cpp configurations -> the store -> statistics -> verdicts.

`spec` says what an audit runs, `session` runs it in waves into the `store`, `summary` computes the
statistics (a pure function of stored rows), `noise` is the noise-floor yardstick, `pipeline` is the
entry that ties them together (locking, servers, judging, writing), `rejudge` reads a finished audit
back, and `compare` sets two audits (or two detectors) side by side."""
