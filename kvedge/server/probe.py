"""Ask a server what it is, merge that with what the user stated, and check it against the GGUF kvedge
templates and tokenizes with (the same file must be served, or the audit would compare two models).

Each setting carries its source: `observed` (the server said so, and where), `stated` (the user said so),
`implied` (follows from another setting), `assumed` (a documented default kvedge cannot check) or
`unknown`. The report prints them as they are.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ServerError
from ..gguf import kvtypes
from ..gguf.model import ModelInfo, read_metadata, sha256_file
from ..llama.runtime import KVConfig, parse_kv
from .client import Client, Unreachable, retry
from .flavors import BY_KIND, UNKNOWN, Observation, Setting, identify
from .spec import ServerSpec

# what a report shows for every server, in this order
SETTINGS = ("model", "adapter", "build", "n_ctx", "type_k", "type_v", "rotation", "flash_attn", "slots")
# what makes two servers the same configuration: all but `slots` (a fleet's devices may differ there)
IDENTITY = tuple(s for s in SETTINGS if s != "slots")
PROBE_PATIENCE = 30.0  # seconds a server may take to come up when the audit starts


@dataclass(frozen=True)
class ServerInfo:
    url: str
    kind: str
    api: str  # "completion" (kvedge's templated prompt, raw) or "chat" (messages; the server's template)
    request_model: str | None
    settings: dict[str, Setting]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return int(self.settings["slots"].value or 1)

    @property
    def kv(self) -> KVConfig | None:
        k, v = self.settings["type_k"].value, self.settings["type_v"].value
        return KVConfig(k, v) if k and v else None

    def identity(self) -> dict[str, Any]:
        """The values that decide this server's results, as the store key holds them."""
        return {"kind": self.kind, "api": self.api, **{k: self.settings[k].value for k in IDENTITY}}

    def to_report(self) -> dict[str, Any]:
        return {"url": self.url, "kind": self.kind, "api": self.api, "request_model": self.request_model,
                "settings": {k: self.settings[k].to_dict() for k in SETTINGS},
                "facts": {k: v for k, v in self.facts.items() if v is not None}}


def _merge(url: str, name: str, observed: Setting, stated: Any) -> Setting:
    if stated is None:
        return observed
    if observed.value is not None and name != "slots" and observed.value != stated:
        raise ServerError(f"{url} reports {name} {observed.value} ({observed.source}) but {stated} was stated")
    return Setting(stated, "stated")


def resolve(spec: ServerSpec, obs: Observation, adapter: Path | None) -> ServerInfo:
    """Observed settings, then stated ones; what neither gives stays unknown (or is implied)."""
    s = dict(obs.settings)
    kv = spec.get("kv")
    if kv and obs.kind == "ollama" and "/" in kv:
        raise ServerError(f"{spec.url} is Ollama, which sets one cache type for K and V (OLLAMA_KV_CACHE_TYPE), "
                          f"not {kv}")
    cfg = parse_kv(kv) if kv else None
    out: dict[str, Setting] = {}
    out["model"] = s.get("model", UNKNOWN)
    seen = s.get("adapter")
    out["adapter"] = seen if seen is not None and seen.value is not None else Setting(
        adapter.name if adapter else "none", "stated: the adapter this audit applies (--lora, the canary)")
    out["build"] = s.get("build", UNKNOWN)
    out["n_ctx"] = _merge(spec.url, "n_ctx", s.get("n_ctx", UNKNOWN), spec.get("ctx"))
    out["type_k"] = Setting(cfg.type_k, "stated") if cfg else UNKNOWN
    out["type_v"] = Setting(cfg.type_v, "stated") if cfg else UNKNOWN
    rot = spec.get("rot")
    if cfg is not None and not cfg.quantized:
        out["rotation"] = Setting(None, "not applicable: the cache is not quantized")
    else:
        out["rotation"] = Setting(rot, "stated") if rot is not None else UNKNOWN
    fa = spec.get("fa")
    if fa is not None:
        if cfg is not None and cfg.v_quantized and not fa:
            raise ServerError(f"{spec.url}: a quantized V cache ({cfg.type_v}) runs only with flash attention in "
                              "llama.cpp, but fa=off was stated")
        out["flash_attn"] = Setting(fa, "stated")
    elif cfg is not None and kvtypes.is_quantized(cfg.type_v):
        out["flash_attn"] = Setting(True, "implied: llama.cpp quantizes the V cache only with flash attention")
    else:
        out["flash_attn"] = UNKNOWN
    slots = spec.get("slots")
    out["slots"] = Setting(slots, "stated") if slots else s.get("slots") or Setting(1, "assumed: one request at a time")
    api = spec.get("api") or "completion"
    return ServerInfo(spec.url, obs.kind, api, obs.request_model, out, dict(obs.facts))


def probe(spec: ServerSpec, timeout: float, adapter: Path | None, patience: float = PROBE_PATIENCE) -> ServerInfo:
    """What the server at `spec.url` is, waiting up to `patience` seconds for it to answer."""
    try:
        obs, _ = retry(lambda: identify(_asking(spec.url, timeout), spec.get("model")), patience)
    except Unreachable as exc:
        raise ServerError(f"cannot reach server {spec.url}: it {exc.what}") from None
    return resolve(spec, obs, adapter)


def reprobe(info: ServerInfo, spec: ServerSpec, timeout: float, adapter: Path | None) -> ServerInfo:
    """Ask again (after a failure): `Unreachable` while it is down; `ServerError` if it came back changed."""
    obs = identify(_asking(info.url, timeout), info.request_model)
    now = resolve(spec, obs, adapter)
    if now.identity() != info.identity():
        raise ServerError(f"server {info.url} came back changed ({describe_change(info.identity(), now.identity())}): "
                          "its results so far are stored; audit the new settings into another --out")
    return now


def _asking(url: str, timeout: float) -> Client:
    """A client for one round of questions (several requests), which all together get `timeout` seconds:
    a retry loop that re-asks a server what it is stays within its bound."""
    return Client(url, timeout, until=time.monotonic() + timeout)


def describe_change(before: dict, after: dict) -> str:
    return "; ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}"
                     for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))


def _local_counts(model: ModelInfo) -> dict[str, int]:
    md, tensors = read_metadata(model.path)
    tokens = md.get("tokenizer.ggml.tokens")
    return {"n_params": sum(int(t.n_elements) for t in tensors),
            "n_vocab": len(tokens) if isinstance(tokens, list) else -1}


def check_model(info: ServerInfo, model: ModelInfo, adapter: Path | None) -> ServerInfo:
    """Refuse a server that serves another model or adapter than the audit's, as far as it lets kvedge
    see; record how the check was made (`facts["model_check"]`)."""
    f = info.facts
    name = model.path.name
    path = f.get("model_path")
    if f.get("model_sha256"):
        if f["model_sha256"] != model.sha256:
            raise ServerError(f"{info.url} serves a model with sha256 {f['model_sha256'][:16]}, not {name} "
                              f"({model.sha256[:16]})")
        how = "sha256 of the served GGUF equals the local file's"
    elif path and Path(path).is_file():  # a server on this machine: compare the files themselves
        if sha256_file(Path(path)) != model.sha256:
            raise ServerError(f"{info.url} serves {path}, which is not {model.path}")
        how = "the served file is on this machine and its sha256 equals the audited file's"
    elif f.get("n_params") is not None and f.get("n_vocab") is not None:
        local = _local_counts(model)
        if (f["n_params"], f["n_vocab"]) != (local["n_params"], local["n_vocab"]):
            raise ServerError(f"{info.url} serves a model with {f['n_params']} parameters and {f['n_vocab']} tokens; "
                              f"{name} has {local['n_params']} and {local['n_vocab']}")
        how = "parameter and vocabulary counts equal the local file's"
    elif posixpath.basename(str(info.settings["model"].value or "")) == name:
        how = "file name only (the server reports no digest, counts or local path)"
    else:
        how = "not verifiable: the server reports no digest, counts or local path"
    adapter_setting = info.settings["adapter"]
    if adapter_setting.provenance == "observed":
        expected_sha = sha256_file(adapter) if adapter else None
        served = f.get("adapter_sha256")
        if served is not None:  # digests (Ollama)
            ok = served == ([expected_sha] if expected_sha else [])
        else:
            ok = adapter_setting.value == (adapter.name if adapter else "none")
        if not ok:
            raise ServerError(f"{info.url} applies adapter(s) {adapter_setting.value!r}, but this audit's is "
                              f"{adapter.name if adapter else 'none'} (--lora, --no-canary)")
    return ServerInfo(info.url, info.kind, info.api, info.request_model, info.settings, {**f, "model_check": how})


def flavor_of(info: ServerInfo):
    return BY_KIND[info.kind]
