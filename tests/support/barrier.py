"""`python -m kvedge ...` with a barrier the test controls, for the tests that interrupt a running audit or
take a server down in the middle of one: so the moment is the test's, and a fast machine cannot finish the
audit first.

    python -c 'from support.barrier import main; main()' SPEC FLAG KVEDGE-ARGS...

SPEC says where the barrier stands:

- `rows=N` (or `rows=N:TABLE,TABLE`): once the results store holds N rows (generations and scores unless
  tables are named), counted after each write, the audit waits in the main thread, where it writes its rows;
- `requests=N`: once N generation requests have gone to the servers, every further request waits (the
  server runs' worker threads), while the audit stores the answers it has.

At the barrier it creates the file FLAG and waits until the file FLAG.go exists (support.cli.Barrier:
`reached`, `release()`), or for a signal: SIGKILL ends it; SIGINT ends it as a Ctrl-C anywhere else does
(KeyboardInterrupt in the main thread). Nothing else changes: kvedge's own code writes every row and sends
every request."""

from __future__ import annotations

import os
import runpy
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
    spec, flag, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    kind, _, rest = spec.partition("=")
    count, _, names = rest.partition(":")
    limit = int(count)
    tables = tuple(names.split(",")) if names else ("generations", "scores")
    go = Path(str(flag) + ".go")
    tripped = threading.Event()
    lock = threading.Lock()
    sent = [0]

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

        def call_or_wait(self, method, path, *a, **kw):
            if method == "POST" and path in GENERATE:
                with lock:
                    if sent[0] >= limit:
                        trip()
                    sent[0] += 1
                if tripped.is_set():
                    wait()
            return call(self, method, path, *a, **kw)

        Client.call = call_or_wait
    else:
        raise SystemExit(f"support.barrier: unknown barrier {spec!r}")
    sys.argv = [sys.argv[0], *args]
    runpy.run_module("kvedge", run_name="__main__", alter_sys=True)
