"""Seeded fuzzing of real GGUF headers: the default model's and the canary adapter's.

Every mutant of the model (cut to its header and a little data, so each case is cheap and none is a
valid model) must be refused with a one-line ModelFileError, quickly (in lines of kvedge run, counted:
the same on any machine) and in bounded memory. Mutants of the adapter (the whole file) must be refused
the same way or accepted, and every accepted one must then load in the real llama.cpp without crashing
the process. A handful of mutants go through the CLI."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from support.cli import run_cli
from kvedge.canary import canary_adapter_path
from kvedge.errors import ModelFileError
from kvedge.gguf.header import read_header
from kvedge.gguf.lora import check_adapter
from kvedge.gguf.model import inspect_model, load_model
from support.work import kvedge_lines

EXTREMES = [0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


def mutate(data: bytes, header_end: int, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of the header: a third anywhere in it, a third in its first 4 KiB (counts, general.*
    keys), a third in its last 16 KiB (the tensor infos)."""
    where = rng.choice(("any", "head", "tail"))
    lo, hi = {"any": (0, header_end), "head": (0, min(4096, header_end)),
              "tail": (max(0, header_end - 16384), header_end)}[where]
    i = rng.randrange(lo, hi)
    kind = rng.choice(("byte", "bits", "u64", "u32", "cut", "insert", "delete"))
    buf = bytearray(data)
    if kind == "byte":
        buf[i] = rng.randrange(256)
    elif kind == "bits":
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    elif kind in ("u64", "u32"):
        fmt, n = ("<Q", 8) if kind == "u64" else ("<I", 4)
        v = rng.choice(EXTREMES + [rng.getrandbits(8 * n)]) % (1 << (8 * n))
        buf[i:i + n] = struct.pack(fmt, v)
    elif kind == "cut":
        del buf[i:]
    elif kind == "insert":
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        del buf[i:i + rng.randint(1, 16)]
    return bytes(buf), f"{kind}@{i}"


def _one_line_refusal(fn, path: Path) -> str:
    with pytest.raises(ModelFileError) as exc:
        fn(path)
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_fuzzed_model_headers_are_refused(tmp_path, model_path):
    end = read_header(model_path).data_offset
    with open(model_path, "rb") as f:
        seed = f.read(end + 4096)  # the header and a little data: never a whole model
    f = tmp_path / "mutant.gguf"
    f.write_bytes(seed)
    with kvedge_lines(limit=10**7) as whole:  # the unmutated header, walked to its end (its data is cut)
        _one_line_refusal(load_model, f)
    rng = random.Random(14)
    most, peak = 0, 0
    kinds: dict[str, int] = {}
    for case in range(300):
        data, what = mutate(seed, end, rng)
        f.write_bytes(data)
        traced = case % 25 == 0  # tracing every allocation slows the walk several times over
        if traced:
            tracemalloc.start()
        try:
            # quickly, counted rather than timed: no mutant costs more than two walks of the whole header
            with kvedge_lines(limit=2 * whole.lines) as work:
                msg = _one_line_refusal(load_model, f)
            if traced:
                peak = max(peak, tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        most = max(most, work.lines)
        first = msg.split(" ", 2)[:2]
        kinds[" ".join(first)] = kinds.get(" ".join(first), 0) + 1
    assert most <= 2 * whole.lines, (most, whole.lines)
    assert peak < 64 * 2**20, peak
    assert len(kinds) >= 3, kinds  # truncation, corruption and bad magic were all reached


@pytest.fixture(scope="module")
def base(model_path):
    return inspect_model(model_path)


def _adapter_mutants(tmp_path: Path, base) -> tuple[list[str], int]:
    """Mutants of the canary adapter (the whole file): (paths of those check_adapter accepts, refused)."""
    src = canary_adapter_path()
    seed = src.read_bytes()
    end = read_header(src).data_offset
    rng = random.Random(1414)
    accepted: list[str] = []
    refused = 0
    for case in range(200):
        data, what = mutate(seed, end, rng)
        f = tmp_path / f"mutant{case}.gguf"
        f.write_bytes(data)
        try:
            check_adapter(f, base)
        except ModelFileError as exc:
            assert "\n" not in str(exc)
            refused += 1
            f.unlink()
            continue
        accepted.append(str(f))
    return accepted, refused


def test_fuzzed_adapters_are_refused_in_one_line(tmp_path, base):
    accepted, refused = _adapter_mutants(tmp_path, base)
    assert refused > 150 and refused + len(accepted) == 200, (refused, len(accepted))


def test_fuzzed_adapters_that_pass_the_check_load_without_crashing(tmp_path, base):
    """The accepted mutants (a changed metadata string, a changed weight byte...) are loaded by the real
    llama.cpp in a child process, which must not crash."""
    accepted, _ = _adapter_mutants(tmp_path, base)
    code = (
        "import sys, json\n"
        "from kvedge.gguf.model import inspect_model, default_model_path\n"
        "from kvedge.llama.runtime import Runtime, KVConfig, RuntimeOptions\n"
        "from kvedge.errors import KvedgeError\n"
        "m = inspect_model(default_model_path())\n"
        "for p in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        with Runtime(m, KVConfig('f16', 'f16'), True, RuntimeOptions(n_ctx=128), p) as rt:\n"
        "            rt.generate(rt.tokenize('Hello'), 2)\n"
        "    except KvedgeError:\n"
        "        pass\n"
        "print('survived', len(json.loads(sys.argv[1])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(accepted[:25])], capture_output=True,
                          text=True, timeout=600)
    assert accepted and proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_fuzzed_files_through_the_cli(tmp_path, model_path):
    end = read_header(model_path).data_offset
    with open(model_path, "rb") as f:
        seed = f.read(end + 4096)
    rng = random.Random(141)
    for case in range(4):
        data, what = mutate(seed, end, rng)
        m = tmp_path / f"m{case}.gguf"
        m.write_bytes(data)
        proc = run_cli("audit", str(m), "--out", str(tmp_path / "o"), "-q", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("kvedge: error:"), (what, proc.stderr)
