"""End to end: real servers on loopback, the real `kvedge` CLI, the real default model with the canary.

The servers are llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`, the
`[server]` extra of the llama-cpp-python kvedge pins): pip installs it in CI from the wheel already
built, and it runs the very llama.cpp build of the in-process audit, so server and in-process verdicts
differ only by how each drives llama.cpp. llama.cpp's own `llama-server` is a separate native build; its
API is covered by recorded responses (tests/unit/test_server.py, and below against the default model)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.cli import Barrier, run_cli, start_with_barrier
from kvedge.gguf import kvtypes
from kvedge.canary import canary_adapter_path
from kvedge.errors import ServerError
from kvedge.gguf.model import load_model
from kvedge.server.probe import check_model, probe
from kvedge.server.spec import parse_server
from support.fakes import write_tiny_gguf

COMMON = ["--benchmarks", "advbench,harmbench,xstest", "--limit", "2", "--max-tokens", "24", "--ctx", "2048", "-q"]
N = 8  # prompts: 2 from each of the four groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llama_cpp.server` serving the default model + canary adapter, as a deployment would."""

    def __init__(self, model: Path, kv: str, log: Path, port: int | None = None):
        self.model, self.kv, self.log = model, kv, log
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, model: Path | None = None) -> "Server":
        t = str(int(kvtypes.ggml_type(self.kv)))
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model or self.model),
                "--lora_path", str(canary_adapter_path()), "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", "2048", "--type_k", t, "--type_v", t, "--flash_attn", "true",
                # one thread, as kvedge runs on this shared machine; logits only where sampled, as in-process
                "--n_threads", "1", "--n_threads_batch", "1", "--logits_all", "false", "--verbose", "false"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"server did not come up: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def serve(tmp_path, model_path):
    started: list[Server] = []

    def make(kv: str) -> Server:
        s = Server(model_path, kv, tmp_path / f"server-{len(started)}.log").start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.kill()


def _rows(db: Path, table: str = "origins") -> int:
    try:
        with sqlite3.connect(db) as c:
            return c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return 0


def _audit_bg(out: Path, barrier: Barrier, *args: str) -> subprocess.Popen:
    """The audit in the background, its server requests held at `barrier` until the test releases it."""
    return start_with_barrier(barrier, "audit", *args, *COMMON, "--out", str(out),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(db: Path, n: int, proc: subprocess.Popen, barrier: Barrier) -> None:
    """Until the store holds `n` server answers and the next request waits at the barrier: the audit is
    still running however fast the machine, and no request is in flight."""
    while _rows(db) < n or not barrier.reached:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)


def test_server_audit_at_f16_and_q4_0_agrees_with_the_in_process_audit(tmp_path, serve):
    f16, q4 = serve("f16"), serve("q4_0")
    local = tmp_path / "local"
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "on", *COMMON, "--out", str(local))
    assert proc.returncode == 0, proc.stderr
    served = tmp_path / "served"
    proc = run_cli("audit", "--server", f16.url + "#kv=f16,fa=on,ctx=2048",
                   "--server", q4.url + "#kv=q4_0,rot=on,ctx=2048", *COMMON, "--out", str(served))
    assert proc.returncode == 0, proc.stderr
    assert f"server {f16.url} (llama-cpp-python): f16, {N} answers" in proc.stdout
    rep = json.loads((served / "report.json").read_text())
    assert [(r["label"], r["where"]) for r in rep["runs"]] == [
        ("f16", "server"), ("f16 noise (flash-attn-off)", "in-process"), ("q4_0 rot=on", "server")]
    for s in rep["servers"]:
        st = s["settings"]
        assert st["build"] == {"value": "llama-cpp-python 0.3.36", "source": "observed: GET /openapi.json"}
        assert st["model"]["source"] == "observed: GET /v1/models" and st["type_k"]["source"] == "stated"
        assert s["facts"]["model_check"].startswith("the served file is on this machine")
    for r in rep["runs"]:
        if r["where"] == "server":
            # the server tokenized kvedge's templated prompt into the very tokens the in-process run saw
            assert r["prompt_tokens_match"]["k"] == r["prompt_tokens_match"]["n"] == N
            assert r["speed"]["generations"] == N and r["kld"]["value"] is None
    cmp_path = tmp_path / "cmp" / "compare.json"
    proc = run_cli("compare", str(local), str(served), "--out", str(cmp_path.parent))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(cmp_path.read_text())["rows"]
    assert {(r["config"], r["prompts"]) for r in rows} == {
        (c, g) for c in ("f16", "q4_0 rot=on") for g in ("harmful", "benign", "all")}
    for r in rows:
        # laptop (in-process) vs server: any disagreement must be within the in-process audit's noise floor
        assert r["vs_noise_of_a"]["verdict"] == "within noise", r
        print(f"{r['config']} {r['prompts']}: agreement {r['agreement']['k']}/{r['agreement']['n']}")
    assert "servers" in json.loads(cmp_path.read_text())["b"]


def test_a_fleet_loses_and_repeats_nothing_when_a_server_is_killed_and_restarted(tmp_path, serve, tmp_path_factory):
    a, b = serve("q4_0"), serve("q4_0")
    out = tmp_path / "fleet"
    # two answers, then every further request waits: each server's worker holds the next prompt
    barrier = Barrier("requests=2", tmp_path_factory.mktemp("barrier"))
    proc = _audit_bg(out, barrier, "--server", a.url + "#kv=q4_0,rot=on", "--server", b.url + "#kv=q4_0,rot=on",
                     "--server-patience", "120")
    db = out / "kvedge.sqlite"
    _wait_rows(db, 2, proc, barrier)
    a.kill()  # mid-audit: a's next request is about to go
    barrier.release()  # it goes, to a dead server, and is retried
    time.sleep(1.0)
    a.start()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    rep = json.loads((out / "report.json").read_text())
    q = rep["runs"][-1]
    assert q["label"] == "q4_0 rot=on" and sum(q["served_by"].values()) == N
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT prompt_id FROM generations WHERE run_key = ?", (q["key"],)).fetchall()
        tags = c.execute("SELECT prompt_id, server, detail_json FROM origins WHERE run_key = ?", (q["key"],)).fetchall()
    assert len(rows) == len({r[0] for r in rows}) == N and len(tags) == N
    assert all(url in (a.url, b.url) for _, url, _ in tags)
    # the kill cost a retry, and nothing was answered twice into the store
    assert q["retried"] >= 1 and sum(json.loads(d)["attempts"] > 1 for _, _, d in tags) == q["retried"]


def test_a_server_that_stays_down_stops_the_audit_the_rerun_resumes_and_a_changed_one_is_refused(
        tmp_path, serve, model_path, tmp_path_factory):
    s = serve("q4_0")
    out = tmp_path / "down"
    args = ["--server", s.url + "#kv=q4_0,rot=on", "--server-patience", "3"]
    barrier = Barrier("requests=2", tmp_path_factory.mktemp("barrier"))  # two answers, then the next request waits
    proc = _audit_bg(out, barrier, *args)
    db = out / "kvedge.sqlite"
    _wait_rows(db, 2, proc, barrier)
    s.kill()
    barrier.release()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (stdout, stderr)
    assert "stopped answering" in stderr and "rerun the same command to resume" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    kept = _rows(db)
    assert 2 <= kept < N
    s.start()
    done = run_cli("audit", *args, *COMMON, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{N - kept} generations run now" in done.stdout
    assert _rows(db) == N
    # the same URL, restarted on another file: a changed server against this store is refused
    s.kill()
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(model_path.read_bytes())
    s.start(copy)
    refused = run_cli("audit", *args, *COMMON, "--out", str(out))
    assert refused.returncode == 2 and "is not what" in refused.stderr and "copy.gguf" in refused.stderr, refused.stderr
    # and a restated cache type for the same server is refused too
    s.kill()
    s.start()
    refused = run_cli("audit", "--server", s.url + "#kv=q8_0", *COMMON, "--out", str(out))
    assert refused.returncode == 2 and "type_k 'q4_0' -> 'q8_0'" in refused.stderr, refused.stderr


LLAMA_SERVER = os.environ.get("KVEDGE_LLAMA_SERVER")


@pytest.mark.skipif(not LLAMA_SERVER, reason="set KVEDGE_LLAMA_SERVER to a llama-server binary built from the "
                    "vendored llama.cpp (CMake target llama-server) to audit llama.cpp's own server too")
def test_a_real_llama_server_reports_what_it_is(tmp_path, model_path):
    port = _free_port()
    log = tmp_path / "llama-server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([LLAMA_SERVER, "-m", str(model_path), "--lora", str(canary_adapter_path()),
                                 "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "-c", "4096", "-np", "2", "-t", "1",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.3)
        out = tmp_path / "ls"
        done = run_cli("audit", "--server", url + "#kv=q4_0,rot=on", *COMMON, "--out", str(out))
        assert done.returncode == 0, done.stderr
        rep = json.loads((out / "report.json").read_text())
        st = rep["servers"][0]["settings"]
        assert rep["servers"][0]["kind"] == "llama-server"
        assert (st["n_ctx"]["value"], st["slots"]["value"]) == (2048, 2)  # per slot: 4096 over 2 slots
        assert st["adapter"] == {"value": canary_adapter_path().name, "source": "observed: GET /lora-adapters"}
        assert st["build"]["source"] == "observed: GET /props"
        q = rep["runs"][-1]
        assert q["prompt_tokens_match"]["k"] == N and q["speed"]["clock"] == "the servers' own timings"
    finally:
        proc.kill()
        proc.wait()


# -- a llama-server (a loopback fake, tests/support/httpfakes.py) checked against the default model's counts --

def test_llama_server_reports_context_slots_build_and_adapters(tiny, tmp_path, servers, model_path):
    adapter = write_tiny_gguf(tmp_path / "smollm2-canary-lora.gguf")
    # a remote llama-server (its model path is not on this machine): checked by its parameter counts
    s = servers("llama-server", "/models/SmolLM2-135M-Instruct.Q4_1.gguf", adapter=adapter)
    info = check_model(probe(parse_server(s.url + "#kv=q4_0,rot=off"), 5, adapter), load_model(model_path), adapter)
    st = info.settings
    assert info.kind == "llama-server"
    assert (st["n_ctx"].value, st["n_ctx"].source) == (2048, "observed: GET /props")
    assert (st["slots"].value, st["build"].value) == (2, "b1-0c1e570")
    assert (st["adapter"].value, st["adapter"].source) == ("smollm2-canary-lora.gguf", "observed: GET /lora-adapters")
    assert st["model"].value == "SmolLM2-135M-Instruct.Q4_1.gguf" and st["rotation"].value is False
    assert info.facts["model_check"] == "parameter and vocabulary counts equal the local file's"
    with pytest.raises(ServerError, match="serves a model with 134515008 parameters"):
        check_model(info, load_model(tiny), adapter)
    with pytest.raises(ServerError, match="applies adapter"):
        check_model(info, load_model(model_path), None)
    with pytest.raises(ServerError, match="reports n_ctx 2048"):
        probe(parse_server(s.url + "#kv=q4_0,ctx=4096"), 5, adapter)
