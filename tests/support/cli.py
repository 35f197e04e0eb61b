"""The kvedge CLI in a subprocess, exactly as a user runs it (`python -m kvedge ...`); the same stopping at a
barrier the test controls; or in this process."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvedge", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """The kvedge CLI in this process (`kvedge.cli.main()`, which `python -m kvedge` runs), answered as
    run_cli answers: exit code, stdout, stderr. For the unit tests of bad input, refused before any model
    is read: in a subprocess each case would pay a new interpreter and, for the commands that need torch,
    seconds of importing it."""
    from kvedge.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["kvedge", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        if isinstance(exc.code, str):  # as the interpreter does: the message on stderr, exit 1
            err.write(exc.code + "\n")
            code = 1
        else:
            code = exc.code or 0
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["kvedge", *args], code, out.getvalue(), err.getvalue())


class Barrier:
    """Where an audit started by `start_with_barrier` stops (tests/support/barrier.py): `rows=N` once its
    store holds N rows, `requests=N` once its servers answered N generation requests. `reached` once it
    waits there; `release()` lets it go on (a test that interrupts it instead never releases it)."""

    def __init__(self, spec: str, folder: Path):
        self.spec, self.flag = spec, Path(folder) / "barrier"

    @property
    def reached(self) -> bool:
        return self.flag.exists()

    def release(self) -> None:
        Path(str(self.flag) + ".go").write_text("")


def start_with_barrier(barrier: Barrier, *args: str, **popen: object) -> subprocess.Popen:
    """`python -m kvedge ARGS` in the background, stopping at `barrier` until the test releases it or
    signals it: so the test chooses the moment, and a fast machine cannot finish the audit first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-c", "from support.barrier import main; main()", barrier.spec,
                             str(barrier.flag), *args], env=env, **popen)
