"""What the user says about a server: `--server URL[#statements]`, and `--server-kv` for all of them.

A server reports some of its settings and not others (no server kvedge knows reports its KV cache
types), so what it does not report the user states. Statements ride in the URL's fragment, which HTTP
never sends to the server: `http://127.0.0.1:8080#kv=q4_0,rot=on`. Keys:

- `kv`: the cache types, as `--kv` writes one config (`q4_0`, `k=q8_0/v=q4_0`)
- `rot`: llama.cpp's attention rotation of a quantized cache, `on` or `off`
- `fa`: flash attention, `on` or `off` (an f16 server with `fa=off` is the audit's noise run)
- `ctx`: the context the server runs with
- `slots`: requests it serves at once (llama-server reports its own; others default to 1)
- `model`: the model name to request (Ollama, OpenAI-compatible endpoints)
- `api`: `completion` (kvedge's templated prompt sent raw, the default where the API allows it) or
  `chat` (messages; the server applies its own template, and the report says so)

Parsing is pure and cheap, so `api.audit` checks every statement before it touches a server or a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import ServerError
from ..llama.runtime import parse_kv

MAX_SLOTS = 64
APIS = ("completion", "chat")
_SWITCH = {"on": True, "off": False}


def _switch(key: str, value: str) -> bool:
    try:
        return _SWITCH[value]
    except KeyError:
        raise ServerError(f"server statement {key}={value!r}: write {key}=on or {key}=off") from None


def _count(key: str, value: str, lo: int, hi: int) -> int:
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise ServerError(f"server statement {key}={value!r}: a whole number from {lo} to {hi}")
    return int(value)


def _statement(key: str, value: str) -> Any:
    if key == "kv":
        return parse_kv(value).name
    if key in ("rot", "fa"):
        return _switch(key, value)
    if key == "ctx":
        return _count(key, value, 64, 1 << 24)
    if key == "slots":
        return _count(key, value, 1, MAX_SLOTS)
    if key == "model":
        if not value:
            raise ServerError("server statement model= needs a model name")
        return value
    if key == "api":
        if value not in APIS:
            raise ServerError(f"server statement api={value!r}: write api=completion or api=chat")
        return value
    raise ServerError(f"unknown server statement {key!r}: use kv, rot, fa, ctx, slots, model or api")


@dataclass(frozen=True)
class ServerSpec:
    """One `--server` argument: where the server is, and what the user states about it."""

    url: str  # scheme://host[:port][/path], without fragment, trailing slash or trailing /v1
    stated: tuple[tuple[str, Any], ...] = ()  # sorted (key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.stated).get(key, default)


def parse_server(arg: str, default_kv: str | None = None) -> ServerSpec:
    """`http://host:port[#kv=q4_0,rot=on,...]`; `default_kv` (from --server-kv) applies unless the URL
    states its own."""
    raw = arg.strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerError(f"--server takes an http(s) URL such as http://127.0.0.1:8080, not {arg!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ServerError(f"--server {arg!r} has a malformed port") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):  # OpenAI clients are often given the /v1 base: kvedge needs the root
        path = path[:-3]
    url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    stated: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in parts.fragment.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ServerError(f"server statement {item!r} in {arg!r}: write key=value, e.g. #kv=q4_0,rot=on")
        key = key.strip()
        if key in stated:
            raise ServerError(f"server statement {key} given twice in {arg!r}")
        stated[key] = _statement(key, value.strip())
    if "kv" not in stated and default_kv:
        stated["kv"] = _statement("kv", default_kv)
    return ServerSpec(url, tuple(sorted(stated.items())))


def parse_servers(args: list[str] | tuple[str, ...], default_kv: str | None = None) -> tuple[ServerSpec, ...]:
    specs = tuple(parse_server(a, default_kv) for a in args)
    urls = [s.url for s in specs]
    dup = next((u for u in urls if urls.count(u) > 1), None)
    if dup:
        raise ServerError(f"--server {dup} is given twice")
    return specs
