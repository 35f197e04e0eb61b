"""What must hold in a runtime for a deployment to run what kvedge verified (kvedge.mitigate.preconditions):
stated in every launch file it concerns, and refused where no runtime can run it (an MLA model with two
cache types, a quantized V without flash attention, an Ollama file for K != V)."""

from __future__ import annotations

import json

import pytest

from kvedge.errors import DeploymentError, KVTypeError
from kvedge.gguf.kvmap import KVConfig
from kvedge.gguf.model import inspect_model, sha256_file
from kvedge.mitigate import candidates
from kvedge.mitigate.deploy import MODELFILE, OLLAMA_ENV, PYTHON_FILE, render_all, render_ollama, RenderingError
from kvedge.mitigate.preconditions import preconditions, refusal
from kvedge.mitigate.verify import check_runnable
from kvedge.results.deploy import Deployment, FileRef, Launch
from support.fakes import write_tiny_gguf


@pytest.fixture
def mla(tmp_path):
    # llama.cpp runs deepseek2 with MLA attention when both MLA head lengths are in the metadata
    mla_keys = {"deepseek2.attention.key_length_mla": 64, "deepseek2.attention.value_length_mla": 64}
    return inspect_model(write_tiny_gguf(tmp_path / "mla.gguf", arch="deepseek2", extra_uint32=mla_keys))


@pytest.fixture
def plain(tmp_path):
    return inspect_model(write_tiny_gguf(tmp_path / "tiny.gguf"))


def _folder(tmp_path, model, launch):
    dep = Deployment(FileRef(str(model.path), sha256_file(model.path), model.size_bytes), None, launch)
    for name, text in render_all(dep, "test", preconditions(launch, model)).items():
        (tmp_path / name).write_text(text)
    return dep


def test_mla_is_read_from_the_metadata(mla, plain):
    assert mla.mla and not plain.mla


def test_an_mla_model_takes_one_cache_type(mla):
    with pytest.raises(KVTypeError, match="MLA attention: llama.cpp takes one cache type for K and V"):
        KVConfig("q8_0", "q4_0").check_fits(mla)
    KVConfig("q8_0", "q8_0").check_fits(mla)


def test_export_widens_both_caches_of_an_mla_model(mla, plain):
    seq = candidates.sequence(mla, KVConfig("q4_0", "q4_0"), False, "K", False, {"mode": "none"})
    assert seq and all(c.kv.type_k == c.kv.type_v for c in seq)
    # the same request on a model without MLA widens K alone
    assert any(c.kv.type_k != c.kv.type_v for c in candidates.sequence(plain, KVConfig("q4_0", "q4_0"), False, "K",
                                                                         False, {"mode": "none"}))


def test_a_deploy_folder_for_mla_with_mixed_types_is_refused(tmp_path, mla):
    dep = _folder(tmp_path, mla, Launch("q8_0", "q4_0", False, 4096))
    with pytest.raises(DeploymentError, match="no runtime can run this deployment as verified: deepseek2 uses MLA"):
        check_runnable(dep, tmp_path)
    assert "MLA" in refusal(Launch("q8_0", "q4_0", False, 4096), mla)
    assert refusal(Launch("q8_0", "q8_0", False, 4096), mla) is None


def test_same_types_on_mla_pass_and_say_why(tmp_path, mla):
    launch = Launch("q8_0", "q8_0", False, 4096)
    dep = _folder(tmp_path, mla, launch)
    check_runnable(dep, tmp_path)
    assert "K and V caches of one type" in (tmp_path / "llama-server.sh").read_text()


def test_a_quantized_v_without_flash_attention_is_refused(plain):
    assert "needs flash attention" in refusal(Launch("q4_0", "q4_0", True, 4096, flash_attn=False), plain)
    assert refusal(Launch("q4_0", "f16", True, 4096, flash_attn=False), plain) is None


def test_an_ollama_rendering_with_k_not_v_is_refused(tmp_path, plain, monkeypatch):
    launch = Launch("q8_0", "q4_0", True, 4096)
    dep = _folder(tmp_path, plain, launch)
    assert not (tmp_path / MODELFILE).exists()  # never written
    with pytest.raises(RenderingError, match="one cache type for K and V"):
        render_ollama(dep, "test")
    # one written by hand (or left from another deployment) is refused by verify's folder check: it cannot
    # say what deploy.json says, and were it read as agreeing, Ollama still could not hold it
    (tmp_path / MODELFILE).write_text(f"FROM {plain.path}\nPARAMETER num_ctx 4096\n")
    (tmp_path / OLLAMA_ENV).write_text("OLLAMA_FLASH_ATTENTION=1\nOLLAMA_KV_CACHE_TYPE=q8_0\n")
    with pytest.raises(DeploymentError, match="Modelfile differs from deploy.json in type_v"):
        check_runnable(dep, tmp_path)
    from kvedge.mitigate import verify

    monkeypatch.setattr(verify, "disagreements", lambda *a: [])
    with pytest.raises(DeploymentError, match="Modelfile cannot hold this deployment: Ollama has one cache type"):
        check_runnable(dep, tmp_path)


@pytest.mark.parametrize("tk,tv", [("q4_0", "q4_0"), ("q8_0", "q4_0"), ("f16", "f16")])
def test_flash_attention_is_stated_in_every_runtime_file(tmp_path, plain, tk, tv):
    launch = Launch(tk, tv, True, 4096)
    _folder(tmp_path, plain, launch)
    files = ["llama-server.sh", "llama-cli.sh", PYTHON_FILE] + ([MODELFILE, OLLAMA_ENV] if tk == tv else [])
    for name in files:
        text = (tmp_path / name).read_text()
        assert "flash attention on" in text, name
        if tv != "f16":
            assert "quantizes the V cache only with flash attention" in text, name
    script = (tmp_path / "llama-server.sh").read_text()
    assert ("applies only to quantized caches" in script) == (tk == "f16")  # no rotation talk for an f16 cache
    kw = json.loads((tmp_path / PYTHON_FILE).read_text())
    assert {p["id"] for p in kw["preconditions"]} >= {"flash-attention"}
    assert kw["kwargs"]["flash_attn"] is True


def test_each_precondition_is_where_it_belongs(plain):
    ids = lambda launch: {p.id: p for p in preconditions(launch, plain)}  # noqa: E731
    same = ids(Launch("q4_0", "q4_0", False, 4096))
    assert set(same) == {"flash-attention", "flash-attention-kernel", "rotation", "ollama-global"}
    assert same["ollama-global"].runtimes == ("ollama",) and same["ollama-global"].check == "unobservable"
    assert same["rotation"].check == "rendered" and "LLAMA_ATTN_ROT_DISABLE=1" in same["rotation"].requirement
    assert ids(Launch("q4_0", "q4_0", True, 4096))["rotation"].check == "doctor"  # the build must have it
    mixed = ids(Launch("q8_0", "q4_0", True, 4096))
    assert "ollama-global" not in mixed and "GGML_CUDA_FA_ALL_QUANTS" in mixed["flash-attention-kernel"].why
    assert "ollama" not in mixed["flash-attention-kernel"].runtimes and "ollama" not in mixed["flash-attention"].runtimes
    assert set(ids(Launch("f16", "f16", True, 4096))) == {"flash-attention", "ollama-global"}
    per_layer = ids(Launch("q4_0", "q4_0", False, 4096, layer_types=(("q8_0", "q4_0"), ("q4_0", "q4_0"))))
    assert per_layer["native-build"].runtimes == ("llama-cpp-python",) and "ollama-global" not in per_layer


def test_a_k_transform_deployment_needs_the_native_build_and_no_ollama(tmp_path, plain):
    launch = Launch("q4_0", "q4_0", False, 4096, k_transform=True)
    pre = {p.id: p for p in preconditions(launch, plain)}
    assert set(pre["native-k-transform"].runtimes) == {"llama-server", "llama-cli", "llama-cpp-python"}
    assert "ignores the transform" in pre["native-k-transform"].why and "ollama-global" not in pre
    dep = _folder(tmp_path, plain, launch)
    assert not (tmp_path / MODELFILE).exists()  # Ollama cannot apply it: no file promises it can
    assert "applies the model's K transform" in (tmp_path / "llama-server.sh").read_text()
    assert Launch.from_dict(dep.to_dict()["launch"]).k_transform
    assert not Launch.from_dict({k: v for k, v in dep.to_dict()["launch"].items() if k != "k_transform"}).k_transform


def test_the_ollama_env_says_its_scope_is_the_whole_server(tmp_path, plain):
    _folder(tmp_path, plain, Launch("q8_0", "q8_0", True, 4096))
    env = (tmp_path / OLLAMA_ENV).read_text()
    assert "one cache type for every model it serves" in env
    assert "one cache type for every model it serves" not in (tmp_path / "llama-server.sh").read_text()
