import pytest

from kvedge.gguf import kvtypes
from kvedge.errors import KVTypeError


def test_one_list_derived_from_gguf_py():
    assert kvtypes.NAMES == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
    assert kvtypes.UNQUANTIZED == ("f32", "f16", "bf16")
    assert kvtypes.bytes_per_value("q4_0") == 18 / 32 and kvtypes.bytes_per_value("bf16") == 2
    assert [kvtypes.nominal_bits(n) for n in ("q8_0", "q5_1", "iq4_nl", "bf16")] == [8, 5, 4, 16]
    assert kvtypes.check("Q8_0") == "q8_0"


@pytest.mark.parametrize("bad", ["q3_k", "int4", "", "f64"])
def test_unknown_types_name_the_accepted_ones(bad):
    with pytest.raises(KVTypeError, match="llama.cpp accepts f32, f16, bf16"):
        kvtypes.check(bad)
