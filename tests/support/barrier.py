"""`python -m kvedge ...` with a barrier the test controls, for the tests that interrupt a running audit or
take a server down in the middle of one: so the moment is the test's, and a fast machine cannot finish the
audit first.

    python -c 'from support.barrier import main; main()' SPEC FLAG KVEDGE-ARGS...

SPEC says where the barrier stands:

- `rows=N` (or `rows=N:TABLE,TABLE`): once the results store holds N rows (generations and scores unless
  tables are named), counted after each write, the audit waits in the main thread, where it writes its rows;
- `requests=N`: once N generation requests have been answered by the servers, every further request waits
  (the server runs' worker threads), while the audit stores the answers it has. A request that fails, or
  that a server refuses for its log-probability parameter (llama-cpp-python without logits_all: kvedge
  asks again without it), does not count.

At the barrier it creates the file FLAG and waits until the file FLAG.go exists (support.cli.Barrier:
`reached`, `release()`), or for a signal: SIGKILL ends it; SIGINT ends it as a Ctrl-C anywhere else does
(KeyboardInterrupt in the main thread). Nothing else changes: kvedge's own code writes every row and sends
every request."""

from __future__ import annotations

import os
import runpy
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

GENERATE = ("/v1/completions", "/v1/chat/completions", "/completion", "/api/generate", "/api/chat")


def held(store_path: Path, tables: tuple[str, ...]) -> int:
    with sqlite3.connect(store_path) as c:
        return sum(c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)


def main() -> None:
    # Ctrl-C as a terminal delivers it, whoever started pytest: a shell running it in the background (`cmd &`
    # without job control) ignores SIGINT, this child inherits that, and Python then installs no
    # KeyboardInterrupt handler, so a test's SIGINT would be lost
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec, flag, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    kind, _, rest = spec.partition("=")
    count, _, names = rest.partition(":")
    limit = int(count)
    tables = tuple(names.split(",")) if names else ("generations", "scores")
    go = Path(str(flag) + ".go")
    tripped = threading.Event()

    def trip() -> None:
        if not tripped.is_set():
            tripped.set()
            flag.write_text(str(os.getpid()))

    def wait() -> None:
        while not go.exists():
            time.sleep(0.05)  # a SIGINT raises KeyboardInterrupt here (main thread)

    if kind == "rows":
        from kvedge.audit.store import Store

        def barrier(put):
            def put_then_wait(self, *a, **kw):
                put(self, *a, **kw)
                if not tripped.is_set() and held(self.path, tables) >= limit:
                    trip()
                    wait()
            return put_then_wait

        for name in ("put_generation", "put_score"):
            setattr(Store, name, barrier(getattr(Store, name)))
    elif kind == "requests":
        from kvedge.server.client import Client

        call = Client.call
        cond = threading.Condition()
        answered, in_flight = [0], [0]

        def admit() -> bool:
            """True to send now; False once N answers are in (the barrier). A request whose fate is open
            (in flight, possibly refused) holds the decision, so the barrier stands at exactly N answers."""
            with cond:
                while True:
                    if answered[0] >= limit:
                        return False
                    if answered[0] + in_flight[0] < limit:
                        in_flight[0] += 1
                        return True
                    cond.wait(0.05)

        def call_or_wait(self, method, path, *a, **kw):
            if method != "POST" or path not in GENERATE:
                return call(self, method, path, *a, **kw)
            if not admit():
                trip()
                wait()
                return call(self, method, path, *a, **kw)
            ok = False
            try:
                reply = call(self, method, path, *a, **kw)
                ok = reply.ok  # a refusal of the logprobs parameter is a failed reply (or raises)
                return reply
            finally:
                with cond:
                    in_flight[0] -= 1
                    answered[0] += ok
                    cond.notify_all()

        Client.call = call_or_wait
    else:
        raise SystemExit(f"support.barrier: unknown barrier {spec!r}")
    sys.argv = [sys.argv[0], *args]
    runpy.run_module("kvedge", run_name="__main__", alter_sys=True)
