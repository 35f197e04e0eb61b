"""The default model described from its header, and cut short anywhere: refused. Files that are missing or
not a GGUF: tests/unit/test_model.py."""

import pytest

from kvedge.errors import ModelFileError
from kvedge.gguf.model import inspect_model


def test_default_model_described(model_path):
    m = inspect_model(model_path)
    assert m.architecture == "llama" and m.n_layer == 30 and m.n_head_kv == 3 and m.head_dim_k == 64
    assert len(m.sha256) == 64 and m.chat_template and "<|im_start|>" in m.chat_template


@pytest.mark.parametrize("keep", [0.5, 0.99, 1e-4])
def test_truncated(tmp_path, model_path, keep):
    data = model_path.read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
        inspect_model(f)
