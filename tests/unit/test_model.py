"""A model file that is missing or not a GGUF is refused. The default model described, and cut short:
tests/e2e/test_model.py."""

import pytest

from kvedge.errors import ModelFileError
from kvedge.gguf.model import inspect_model


def test_missing(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        inspect_model(tmp_path / "nope.gguf")

def test_not_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        inspect_model(f)
