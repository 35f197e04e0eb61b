"""`kvedge pcr` on bad input: one line, exit 2, before any model is run. The PCR pass itself, on the
real default model: tests/e2e/test_pcr.py."""

from __future__ import annotations

import numpy as np
import pytest

from support.cli import run_cli_here as run_cli  # in this process: bad input never reaches a model


@pytest.mark.parametrize("args,needle", [
    (["--kv", "f16"], "not one"),
    (["--kv", "q3_k"], "q3_k"),
    (["--rotation", "sideways"], "--rotation"),
])
def test_bad_input_is_one_line_exit_2(args, needle) -> None:
    proc = run_cli("pcr", *args, "-q")
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr

def test_unsupported_architecture_exit_2(tmp_path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = run_cli("pcr", str(path), "-q")
    assert proc.returncode == 2, proc.stderr
    assert "mamba" in proc.stderr and "llama" in proc.stderr and "Traceback" not in proc.stderr
