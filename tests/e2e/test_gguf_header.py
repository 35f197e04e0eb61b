"""The header walker's caps against the real default model's header: far above what a real model holds.
The hostile headers: tests/unit/test_gguf_header.py."""

from __future__ import annotations

from kvedge.gguf import header as gguf_header
from kvedge.gguf.header import read_header


def test_caps_are_far_above_the_default_model(model_path):
    h = read_header(model_path)
    arrays = sum(v.count for v in h.fields.values() if isinstance(v, gguf_header.ArrayValue))
    assert len(h.tensors) == 272 and arrays < gguf_header.MAX_ARRAY_ELEMENTS / 20
    assert h.data_offset < gguf_header.MAX_HEADER_BYTES / 50
