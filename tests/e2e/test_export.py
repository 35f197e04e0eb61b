"""`kvedge export` and `kvedge verify` end to end: the real CLI, real llama.cpp, the real default model and
canary (copies, so that their bytes can be watched and a deployment's files altered), the real torch pass.

One smoothed export (`--smooth only`, so the patched path always runs and is the one candidate) and one
plain export share a work folder: the second reuses the first's PCR report and calib stores, as a user's
rerun would. On one prompt per group no candidate can be shown equivalent at a real margin, so these
exports pass `--delta 10`: every candidate then passes, which tests the plumbing of the sequence, not the
rule (tests/unit/test_verdict.py tests the rule)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys

import gguf
import pytest

pytest.importorskip("torch")

from support.cli import run_cli  # noqa: E402
from kvedge.canary import canary_adapter_path  # noqa: E402
from kvedge.mitigate.deploy import Deployment, disagreements, expected, read_renderings  # noqa: E402

MAX_TOKENS = "32"


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, model_path):
    src = tmp_path_factory.mktemp("sources")
    model, adapter = src / model_path.name, src / "canary.gguf"
    shutil.copyfile(model_path, model)
    shutil.copyfile(canary_adapter_path(), adapter)
    return {"dir": src, "model": model, "adapter": adapter, "work": tmp_path_factory.mktemp("work"),
            "before": {p.name: (_sha(p), p.stat().st_mtime_ns) for p in (model, adapter)}}


def _export(sources, out, *extra, timeout: float = 3600):
    # a PCR pass, the smoothing simulation, the self-check and calib audits: ~10 min alone on 2 cores
    return run_cli("export", str(sources["model"]), "--lora", str(sources["adapter"]), "--kv", "q4_0", "--rotation",
                   "off", "--limit", "1", "--max-tokens", MAX_TOKENS, "--work", str(sources["work"]), "--out", str(out),
                   "-q", *extra, timeout=timeout)


@pytest.fixture(scope="module")
def smoothed(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "smoothed"
    proc = _export(sources, out, "--delta", "10", "--smooth", "only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "doc": json.loads((out / "deploy.json").read_text())}


@pytest.fixture(scope="module")
def unmitigated(sources, smoothed, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "plain"
    proc = _export(sources, out, "--delta", "10", "--smooth", "off", "--transform", "off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "doc": json.loads((out / "deploy.json").read_text())}


@pytest.fixture(scope="module")
def transformed(sources, native_build, tmp_path_factory):
    """`--transform only`: the model carrying the K transform is the one candidate. It runs on the native build,
    so its calib stores are its own (a work folder of its own: the keys name the library)."""
    out = tmp_path_factory.mktemp("deploy") / "transformed"
    work = tmp_path_factory.mktemp("work-kt")
    proc = run_cli("export", str(sources["model"]), "--lora", str(sources["adapter"]), "--kv", "q4_0", "--rotation",
                   "off", "--limit", "1", "--max-tokens", MAX_TOKENS, "--work", str(work), "--out", str(out), "-q",
                   "--delta", "10", "--smooth", "off", "--transform", "only", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "doc": json.loads((out / "deploy.json").read_text())}


def test_smoothed_export_is_complete_and_checked(smoothed, sources):
    doc, out = smoothed["doc"], smoothed["out"]
    assert doc["schema"] == "kvedge.deploy/2" and doc["equivalence"]["delta"] == 10
    dep = doc["deployment"]
    assert dep["smoothed"] and dep["launch"] == {"type_k": "q4_0", "type_v": "q4_0", "rotation": False, "n_ctx": 4096,
                                                  "flash_attn": True, "layer_types": None, "k_transform": False}
    assert dep["kv_bytes_at_ctx"] == 6480 * 4096  # 30 layers x 2 x 192 values x 18/32 bytes
    for name, f in doc["files"].items():
        assert _sha(out / name) == f["sha256"], name
    # PCR's evidence and the candidates it ordered
    ev = doc["evidence"]["pcr"]
    assert ev["verdict"]["mode"] in ("none", "outlier-crushes-safety", "outlier-as-safety", "multi-layer dilution")
    assert [c["label"] for c in doc["decision"]["candidates"]] == ["q4_0 rot=off smoothed"]
    assert doc["decision"]["qualified"] and doc["decision"]["chosen"] == "q4_0 rot=off smoothed"
    assert doc["decision"]["candidates"][0]["measured"]["verdict"]["verdict"] == "equivalent"
    assert doc["decision"]["unmitigated_on_calib"]["harmful"]["n"] == 4  # --limit 1: one prompt of each harmful group
    # the smoothing: simulated on calib, written exactly, checked through llama.cpp
    sm = doc["smoothing"]
    assert sm["self_check"]["passed"] and sm["self_check"]["patched"]["n_positions"] == 320  # 40 calib prompts x 8
    assert sm["self_check"]["patched"]["kld"] <= sm["self_check"]["noise"]["kld"]
    assert sm["patch"]["model"]["tensors_widened"] == []  # K smoothing scales rows: exact in Q4_1
    assert len(sm["simulation"]["scored"]) == len(sm["simulation"]["recipes"]) == 8
    patched = gguf.GGUFReader(out / dep["model"]["path"])
    original = gguf.GGUFReader(sources["model"])
    fields = {f.name for f in patched.fields.values()}
    assert {"kvedge.smoothing.exponents", "kvedge.smoothing.source_sha256", "kvedge.smoothing.recipe"} <= fields
    assert fields - {f.name for f in original.fields.values()} == {
        "kvedge.smoothing.exponents", "kvedge.smoothing.source_sha256", "kvedge.smoothing.recipe",
        "kvedge.smoothing.version", "kvedge.smoothing.how"}
    changed = {t.name for t, u in zip(patched.tensors, original.tensors) if bytes(t.data) != bytes(u.data)}
    assert changed and all(".attn_q." in n or ".attn_k." in n for n in changed)
    assert gguf.GGUFReader(out / dep["adapter"]["path"]).fields["general.type"].contents() == "adapter"


def test_inputs_untouched(smoothed, unmitigated, sources):
    after = {p.name: (_sha(p), p.stat().st_mtime_ns) for p in (sources["model"], sources["adapter"])}
    assert after == sources["before"]
    assert sorted(p.name for p in sources["dir"].iterdir()) == sorted(after)  # nothing written beside them


def test_renderings_read_back_as_deploy_json(smoothed, unmitigated):
    for d in (smoothed, unmitigated):
        dep = Deployment.from_dict(d["doc"]["deployment"])
        got = read_renderings(d["out"])
        assert set(got) == {"llama-server.sh", "llama-cli.sh", "llama-cpp-python.json", "Modelfile"}
        assert all(p == expected(dep, d["out"]) for p in got.values())
        assert disagreements(dep, d["out"]) == []
    # the unmitigated deployment points at the user's own files and rotates nothing
    text = (unmitigated["out"] / "Modelfile").read_text()
    assert f"FROM {unmitigated['doc']['source']['model']['path']}" in text
    assert "LLAMA_ATTN_ROT_DISABLE=1" in (unmitigated["out"] / "ollama.env").read_text()
    assert "OLLAMA_KV_CACHE_TYPE=q4_0" in (unmitigated["out"] / "ollama.env").read_text()


def test_verify_the_smoothed_deployment(smoothed):
    proc = run_cli("verify", str(smoothed["out"]), "--limit", "1", "-q", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((smoothed["out"] / "verify" / "verify.json").read_text())
    assert rep["schema"] == "kvedge.verify/2" and rep["split"] == "eval" and rep["prompts_summary"]["n"] == 7
    roles = [r["role"] for r in rep["rows"]]
    assert roles == ["reference", "noise", "unmitigated", "deployment-f16", "deployment"]
    rec = rep["recovery"]["deployment"]
    assert rec["memory_overhead"] == 0 and rec["n_prompts"] == 7
    if rec["flips_unmitigated"]:
        assert rec["flips"]["value"] == pytest.approx(1 - rec["flips_mitigated"] / rec["flips_unmitigated"])
    else:
        assert rec["flips"]["value"] is None
    # judged at the export's margin (10 nats here): equivalent, so the gate passes
    assert rep["equivalence"]["delta"] == 10 and rep["gate"]["verdict"] == "equivalent"
    assert rep["gate"]["passed"] and "PASS" in proc.stdout


def test_transformed_export_carries_the_transform_in_metadata_only(transformed, sources):
    doc, out = transformed["doc"], transformed["out"]
    dep = doc["deployment"]
    assert dep["kind"] == "k-transform" and dep["label"] == "q4_0 rot=off k-transform" and not dep["smoothed"]
    assert dep["launch"]["k_transform"] and dep["kv_bytes_at_ctx"] == 6480 * 4096  # 1.00x the q4_0 cache
    assert [c["label"] for c in doc["decision"]["candidates"]] == ["q4_0 rot=off k-transform"]
    assert doc["decision"]["chosen"] == "q4_0 rot=off k-transform"
    assert doc["evidence"]["calib"]["backend"] == "cpu"
    kt = doc["k_transform"]
    assert kt["self_check"]["passed"] and kt["self_check"]["patched"]["n_positions"] == 320
    assert kt["simulation"]["chosen"] is not None and "transform" not in kt["simulation"]  # the arrays: in the file
    assert len(kt["simulation"]["scored"]) == 9
    assert "native-k-transform" in {p["id"] for p in dep["preconditions"]}
    assert not (out / "Modelfile").exists() and "Ollama" in doc["renderings"]["ollama"]["note"]
    # the tensors are the original's byte for byte; only metadata was added
    model = gguf.GGUFReader(out / dep["model"]["path"])
    original = gguf.GGUFReader(sources["model"])
    assert all(bytes(t.data) == bytes(u.data) for t, u in zip(model.tensors, original.tensors))
    added = {f.name for f in model.fields.values()} - {f.name for f in original.fields.values()}
    assert {"kvedge.k_transform.version", "kvedge.k_transform.scale"} <= added or \
        {"kvedge.k_transform.version", "kvedge.k_transform.mu"} <= added
    # the adapter is the user's own, pointed at
    assert dep["adapter"]["path"] == str(sources["adapter"].resolve())
    assert "K transform" in (out / "DEPLOY.md").read_text()


def test_verify_the_transformed_deployment_on_the_native_build(transformed):
    proc = run_cli("verify", str(transformed["out"]), "--limit", "1", "-q", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((transformed["out"] / "verify" / "verify.json").read_text())
    assert [r["role"] for r in rep["rows"]] == ["reference", "noise", "unmitigated", "deployment-f16", "deployment"]
    assert rep["backend"]["library"]["kind"] == "native"  # the whole comparison on the one library
    assert rep["gate"]["passed"] and rep["recovery"]["deployment"]["memory_overhead"] == 0


def test_verify_exits_1_unless_the_deployment_is_equivalent(unmitigated):
    """The plain export went down the whole sequence to the unmitigated q4_0 cache without rotation (every
    candidate passes at 10 nats); verified at a real margin on 16 eval prompts it is not shown equivalent."""
    out = unmitigated["out"]
    doc = unmitigated["doc"]
    assert doc["deployment"]["label"] == "q4_0 rot=off" and doc["decision"]["stopped_at"] is None
    assert [c["label"] for c in doc["decision"]["candidates"]][0] == "k=q8_0/v=q4_0 rot=off"
    proc = run_cli("verify", str(out), "--limit", "4", "--delta", "0.2", "-q", timeout=3600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rep = json.loads((out / "verify" / "verify.json").read_text())
    dep = next(r for r in rep["rows"] if r["role"] == "deployment")
    assert dep["verdict"]["verdict"] != "equivalent" and not rep["gate"]["passed"]
    assert dep["verdict"]["harmful"]["shift"]["n"] == 16 and dep["verdict"]["benign"]["shift"]["n"] == 12
    assert "FAIL" in proc.stdout and "kvedge: error" not in proc.stderr


def test_verify_refuses_altered_files(smoothed, tmp_path):
    bad = tmp_path / "altered"
    shutil.copytree(smoothed["out"], bad, ignore=shutil.ignore_patterns("verify"))
    adapter = bad / smoothed["doc"]["deployment"]["adapter"]["path"]
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1
    adapter.write_bytes(bytes(data))
    proc = run_cli("verify", str(bad), "--limit", "1", "-q")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kvedge: error: sha256 mismatch") and len(proc.stderr.strip().splitlines()) == 1
    # a deploy.json edited to another cache type no longer matches its renderings
    shutil.rmtree(bad)
    shutil.copytree(smoothed["out"], bad, ignore=shutil.ignore_patterns("verify"))
    doc = json.loads((bad / "deploy.json").read_text())
    doc["deployment"]["launch"]["type_k"] = "q8_0"
    (bad / "deploy.json").write_text(json.dumps(doc))
    proc = run_cli("verify", str(bad), "-q")
    assert proc.returncode == 2 and "differs from deploy.json in type_k" in proc.stderr


@contextlib.contextmanager
def _tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@contextlib.contextmanager
def _read_only(path):
    if os.geteuid() != 0:  # root ignores file modes: a read-only mount stands in
        path.mkdir()
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
    else:
        with _tmpfs(path, "ro,size=1m") as p:
            yield p


def test_export_into_a_read_only_folder(sources, tmp_path):
    with _read_only(tmp_path / "ro") as ro:
        proc = _export(sources, ro / "deploy", "--delta", "10")
        assert proc.returncode == 2 and proc.stderr.startswith("kvedge: error: cannot write in")
        assert list(ro.iterdir()) == []


def test_export_into_a_full_folder(sources, tmp_path):
    with _tmpfs(tmp_path / "full", "size=4m") as full:
        proc = _export(sources, full / "deploy", "--delta", "10", "--smooth", "only")
        assert proc.returncode == 2 and "not enough free space" in proc.stderr
        assert list(full.iterdir()) == []


def test_a_write_that_fails_keeps_nothing(sources, smoothed, tmp_path):
    """Past every check, the copy of the smoothed model fails for real (a 20 MB file-size limit: EFBIG, as
    a full disk gives ENOSPC): exit 2, and the deployment folder is gone again."""
    out = tmp_path / "deploy"
    limit = 20 << 20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "kvedge", "export", str(sources["model"]), "--lora",
                           str(sources["adapter"]), "--kv", "q4_0", "--rotation", "off", "--limit", "1", "--max-tokens",
                           MAX_TOKENS, "--work", str(sources["work"]), "--out", str(out), "--delta", "10", "--smooth",
                           "only", "-q"], capture_output=True, text=True, preexec_fn=cap, timeout=1800)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kvedge: error: cannot write {out}") and last.endswith("nothing was kept")
    assert not out.exists()


def test_the_deployment_states_its_preconditions_and_a_server_is_checked_against_them(unmitigated, sources, servers):
    """Every launch file says what must hold (flash attention for the quantized V, the rotation switched off);
    `verify --server` against a llama-server serving these very files finds the model and context as deployed
    and the cache settings unknown (no server reports them), so it refuses to call the deployment verified."""
    out = unmitigated["out"]
    pre = {p["id"]: p for p in unmitigated["doc"]["deployment"]["preconditions"]}
    assert {"flash-attention", "flash-attention-kernel", "rotation", "ollama-global"} <= set(pre)
    for name in ("llama-server.sh", "llama-cli.sh", "llama-cpp-python.json", "Modelfile", "ollama.env"):
        assert "quantizes the V cache only with flash attention" in (out / name).read_text(), name
    assert "## Preconditions" in (out / "DEPLOY.md").read_text()

    srv = servers("llama-server", sources["model"], adapter=sources["adapter"])
    proc = run_cli("verify", str(out), "--server", srv.url, "--server-timeout", "10", "--server-patience", "0",
                   "--out", str(out / "server-check"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "NOT VERIFIED" in proc.stdout and "type_k: unknown" in proc.stdout
    check = json.loads((out / "server-check" / "server-check.json").read_text())
    rows = {r["item"]: r["status"] for r in check["rows"]}
    assert rows["model"] == "ok" and rows["adapter"] == "ok" and rows["type_k"] == "unknown"
    assert check["verified"] is False and (out / "server-check" / "server-check.html").is_file()
    assert not srv.generations()  # a check, not an audit
