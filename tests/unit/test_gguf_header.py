"""Hostile GGUF headers, built byte by byte: each is refused by kvedge's bounded walker with a one-line
ModelFileError, quickly (in lines of kvedge run, counted: the same on any machine) and in little memory,
before gguf-py or llama.cpp sees the file. The caps against the default model's header:
tests/e2e/test_gguf_header.py."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from kvedge.errors import ModelFileError
from kvedge.gguf.header import read_header
from kvedge.gguf.model import inspect_model
from support.work import kvedge_lines

U8, U32, F32, STR, ARR, U64 = 0, 4, 6, 8, 9, 10
F16 = 1


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims: tuple[int, ...], gtype: int = F16, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<q", d) for d in dims) + \
        struct.pack("<IQ", gtype, offset)


BASE_KV = [kv("general.architecture", STR, s("llama")), kv("llama.block_count", U32, struct.pack("<I", 1))]


def gguf(kvs=None, tensors=None, n_kv=None, n_tensors=None, version=3, magic=b"GGUF", data=None) -> bytes:
    kvs = BASE_KV if kvs is None else kvs
    tensors = [tinfo("w", (32, 2))] if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32)
    return head + (b"\0" * 128 if data is None else data)


CASES = {
    "wrong magic": (gguf(magic=b"GGUX"), "not a GGUF"),
    "version 1": (gguf(version=1), "version 1"),
    "version 99": (gguf(version=99), "version 99"),
    "big-endian": (gguf(version=3 << 24), "big-endian"),
    "2**60 tensors": (gguf(n_tensors=2**60), "tensors declared"),
    "2**60 metadata entries": (gguf(n_kv=2**60), "metadata entries declared"),
    "more entries than the file holds": (gguf(n_kv=1000), "key 3"),  # reads tensor infos as keys
    "huge key length": (gguf(kvs=[struct.pack("<Q", 2**62) + b"x"]), "cap"),
    "key past the end": (gguf(kvs=[struct.pack("<Q", 10**6) + b"x"]), "truncated"),
    "huge string value": (gguf(kvs=[kv("a", STR, struct.pack("<Q", 2**40))]), "cap"),
    "string value past the end": (gguf(kvs=[kv("a", STR, struct.pack("<Q", 10**6))]), "truncated"),
    "array of 2**40 u8": (gguf(kvs=[kv("a", ARR, struct.pack("<IQ", U8, 2**40))]), "elements"),
    "array past the end": (gguf(kvs=[kv("a", ARR, struct.pack("<IQ", U32, 10**6))]), "truncated"),
    "array of 10**6 strings in 8 bytes": (gguf(kvs=[kv("a", ARR, struct.pack("<IQ", STR, 10**6))]), "truncated"),
    "array of arrays": (gguf(kvs=[kv("a", ARR, struct.pack("<IQ", ARR, 1))]), "array of arrays"),
    "unknown value type": (gguf(kvs=[kv("a", 77, b"")]), "not a GGUF value type"),
    "empty key": (gguf(kvs=[kv("", U32, b"\0" * 4)]), "empty"),
    "duplicate key": (gguf(kvs=BASE_KV + [BASE_KV[1]]), "duplicate key"),
    "key not UTF-8": (gguf(kvs=[s(b"\xff\xfe") + struct.pack("<I", U32) + b"\0" * 4]), "UTF-8"),
    "alignment 3": (gguf(kvs=BASE_KV + [kv("general.alignment", U32, struct.pack("<I", 3))]), "power of two"),
    "alignment as a string": (gguf(kvs=BASE_KV + [kv("general.alignment", STR, s("32"))]), "power of two"),
    "tensor name too long": (gguf(tensors=[tinfo("w" * 64, (32, 2))]), "longer than 63"),
    "5 dimensions": (gguf(tensors=[tinfo("w", (32, 1, 1, 1, 1))]), "5 dimensions"),
    "negative dimension": (gguf(tensors=[tinfo("w", (32, -2))]), "negative"),
    "element count overflows": (gguf(tensors=[tinfo("w", (2**32, 2**32))]), "more elements"),
    "unknown ggml type": (gguf(tensors=[tinfo("w", (32, 2), gtype=1000)]), "unknown ggml type"),
    "row not a block multiple": (gguf(tensors=[tinfo("w", (33, 2), gtype=2)]), "block"),
    "duplicate tensor": (gguf(tensors=[tinfo("w", (32, 2)), tinfo("w", (32, 2), offset=128)]), "duplicate tensor"),
    "data past the end": (gguf(tensors=[tinfo("w", (32, 2**20))]), "truncated"),
    "offset far past the end": (gguf(tensors=[tinfo("w", (32, 2), offset=2**62)]), "offset"),
    "overlapping tensors": (gguf(tensors=[tinfo("w", (32, 2)), tinfo("v", (32, 2), offset=0)]), "offset"),
    "misaligned offset": (gguf(tensors=[tinfo("w", (32, 2)), tinfo("v", (32, 2), offset=130)]), "offset"),
    "empty file": (b"", "not a GGUF"),
    "magic only": (b"GGUF", "truncated"),
}


def test_a_well_formed_header_passes(tmp_path):
    f = tmp_path / "ok.gguf"
    f.write_bytes(gguf(tensors=[tinfo("w", (32, 2)), tinfo("v", (32, 2), offset=128)], data=b"\0" * 256))
    h = read_header(f)
    assert h.version == 3 and h.alignment == 32 and h.fields["general.architecture"] == "llama"
    assert h.tensors["v"].offset == 128 and h.tensors["v"].n_bytes == 128 and h.tensors["w"].dim(2) == 1


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_header_is_refused_in_one_line(tmp_path, name):
    data, needle = CASES[name]
    f = tmp_path / "bad.gguf"
    f.write_bytes(data)
    tracemalloc.start()
    try:
        # quickly, counted rather than timed: a well-formed two-tensor header takes ~360 lines of kvedge
        with kvedge_lines(limit=2_000), pytest.raises(ModelFileError) as exc:
            inspect_model(f)  # the walker runs first: gguf-py never sees these files
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg, msg
    assert peak < 16 * 2**20


def test_truncated_anywhere(tmp_path):
    """A small real GGUF (the canary adapter) cut at many points, header and data: always refused."""
    from kvedge.canary import canary_adapter_path

    data = canary_adapter_path().read_bytes()
    end = read_header(canary_adapter_path()).data_offset
    cuts = list(range(0, end + 64, 61)) + [len(data) - 1, len(data) - 4096, end + 100_000]
    f = tmp_path / "cut.gguf"
    for n in cuts:
        f.write_bytes(data[:n])
        with pytest.raises(ModelFileError, match="truncated|not a GGUF|corrupt"):
            read_header(f)
