"""`--server URL[#statements]` and `--server-kv`: parsed and checked before anything is contacted."""

from __future__ import annotations

import pytest

from kvedge.errors import KvedgeError, ServerError
from kvedge.server.spec import parse_server, parse_servers


def test_url_and_statements():
    s = parse_server("http://127.0.0.1:8080/#kv=k=q8_0/v=q4_0, rot=off,fa=on,ctx=4096,slots=4,model=smollm2,api=chat")
    assert s.url == "http://127.0.0.1:8080"
    assert dict(s.stated) == {"kv": "k=q8_0/v=q4_0", "rot": False, "fa": True, "ctx": 4096, "slots": 4,
                              "model": "smollm2", "api": "chat"}
    # an OpenAI client's /v1 base is accepted; kvedge needs the server's root
    assert parse_server("https://example.org/llm/v1").url == "https://example.org/llm"
    assert parse_server("http://h:1#kv=Q4_0").get("kv") == "q4_0"


def test_server_kv_is_the_default_statement():
    a, b = parse_servers(["http://a:1", "http://b:2#kv=f16"], default_kv="q4_0")
    assert a.get("kv") == "q4_0" and b.get("kv") == "f16"


@pytest.mark.parametrize("arg, needle", [
    ("127.0.0.1:8080", "http(s) URL"),
    ("ftp://h:1", "http(s) URL"),
    ("http://h:99999", "malformed port"),
    ("http://h:1#kv=q3_k", "unknown KV cache type"),
    ("http://h:1#rot=maybe", "rot=on or rot=off"),
    ("http://h:1#slots=0", "from 1 to 64"),
    ("http://h:1#color=red", "unknown server statement"),
    ("http://h:1#kv", "key=value"),
    ("http://h:1#kv=q4_0,kv=q8_0", "given twice"),
    ("http://h:1#api=grpc", "api=completion or api=chat"),
])
def test_bad_statements_are_one_clear_error(arg, needle):
    with pytest.raises(KvedgeError) as exc:
        parse_server(arg)
    assert needle in str(exc.value)


def test_the_same_server_twice_is_refused():
    with pytest.raises(ServerError, match="given twice"):
        parse_servers(["http://h:1#kv=f16", "http://h:1/#kv=q4_0"])
