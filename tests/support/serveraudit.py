"""Helpers of the server audits' unit tests: a server audit on the fakes (no model loaded), the answers a
store holds, the CLI run in this process, and the byte vocabulary that stands in for the GGUF's."""

from __future__ import annotations

import functools
import sqlite3
import sys

import pytest

import kvedge.server.runtime as server_runtime
from kvedge import api, cli
from support.fakes import BENIGN, HARMFUL, FakeRuntimes
from support.httpfakes import ByteTokenizer

N = len(HARMFUL) + len(BENIGN)


@pytest.fixture(autouse=True)
def byte_vocab(monkeypatch):
    monkeypatch.setattr(server_runtime, "LocalTokenizer", ByteTokenizer)


def server_audit(tiny, prompts, out, server, **kw):
    kw.setdefault("server_patience", 5)
    return api.audit(model=tiny, prompts=prompts, out=out, progress=False, runtimes=FakeRuntimes(), max_tokens=16,
                     server=server, **kw)


def stored(out, run_key=None):
    with sqlite3.connect(out / "kvedge.sqlite") as c:
        q = "SELECT run_key, prompt_id FROM generations" + (" WHERE run_key = ?" if run_key else "")
        return c.execute(q, (run_key,) if run_key else ()).fetchall()


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(api, "audit", functools.partial(api.audit, runtimes=FakeRuntimes()))
    monkeypatch.setattr(sys, "argv", ["kvedge", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err
