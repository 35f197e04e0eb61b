"""The one geometry reader (kvedge.gguf.model.read_geometry): llama.cpp's defaults for the keys a GGUF may
leave out, per-layer values, bad values; the torch forward and ModelInfo read the same numbers."""

from __future__ import annotations

import pytest

from kvedge.errors import ModelFileError, UnsupportedArchitecture
from kvedge.gguf.model import inspect_model, read_geometry

BASE = {"general.architecture": "llama", "llama.block_count": 4, "llama.embedding_length": 256,
        "llama.attention.head_count": 4}


def test_defaults_are_llama_cpps() -> None:
    g = read_geometry(BASE)
    assert (g.n_layer, g.n_embd, g.n_head, g.n_head_kv) == (4, 256, 4, 4)
    assert (g.head_dim_k, g.head_dim_v, g.n_rot, g.n_ctx_train, g.per_layer) == (64, 64, 64, 0, ())
    # value_length defaults to n_embd / n_head, not to key_length; n_rot follows key_length
    g = read_geometry(BASE | {"llama.attention.key_length": 128, "llama.attention.head_count_kv": 2})
    assert (g.head_dim_k, g.head_dim_v, g.n_rot, g.n_head_kv) == (128, 64, 128, 2)


def test_per_layer_values_keep_the_largest_and_say_so() -> None:
    g = read_geometry(BASE | {"llama.attention.head_count_kv": [1, 2, 2, 1]})
    assert g.n_head_kv == 2 and g.per_layer == ("llama.attention.head_count_kv",)
    from kvedge.pcr.torch.gguf_torch import _hparams

    with pytest.raises(UnsupportedArchitecture, match="varies per layer"):
        _hparams(BASE | {"llama.attention.head_count_kv": [1, 2, 2, 1], "llama.attention.layer_norm_rms_epsilon": 1e-5},
                 n_vocab=10)


@pytest.mark.parametrize("bad", [{"llama.attention.head_count": "4"}, {"llama.block_count": -1},
                                 {"general.architecture": ""}, {"llama.embedding_length": None}])
def test_bad_values_are_model_file_errors(bad) -> None:
    md = {k: v for k, v in (BASE | bad).items() if v is not None}
    with pytest.raises(ModelFileError):
        read_geometry(md)


def test_model_info_and_the_torch_forward_agree(model_path) -> None:
    pytest.importorskip("torch")
    from kvedge.gguf.model import read_metadata
    from kvedge.pcr.torch.gguf_torch import _hparams

    info = inspect_model(model_path)
    hp = _hparams(read_metadata(model_path)[0], n_vocab=1)
    g = hp.geometry
    assert (info.n_layer, info.n_head, info.n_head_kv, info.head_dim_k, info.head_dim_v) == (
        g.n_layer, g.n_head, g.n_head_kv, g.head_dim_k, g.head_dim_v)
    assert (hp.n_layer, hp.n_head_kv, hp.head_dim_k, hp.n_rot) == (30, 3, 64, 64)
