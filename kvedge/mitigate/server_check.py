"""`kvedge verify DIR --server URL`: what a running server observably applies, against deploy.json.

A deployment folder states its configuration; a server started from it may still run something else (an
older build without the rotation, flash attention off, an Ollama with another cache type, another model).
kvedge asks the server what it is (kvedge.server.probe: llama-server's /props, Ollama's /api/show and
/api/ps, ...) and compares every setting and precondition it can see. No server kvedge knows reports its
KV cache types, flash attention or rotation, so those stay `unknown`, and an unknown is not a pass: the
deployment is called verified on a server only when every row is observed as deploy.json says. Behaviour
is measured by an audit (`kvedge audit --server URL#kv=...,rot=...`), not by this check.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import ServerError
from ..gguf.model import ModelInfo, inspect_model
from ..results.deploy import DeploymentDoc
from ..results.verify import SERVER_CHECK_SCHEMA, ServerCheck, ServerCheckRow
from ..server.flavors import Setting
from ..server.probe import ServerInfo, check_model, probe
from ..server.spec import parse_server
from .preconditions import preconditions, quantized

# the deployment's runtime each server kind is (an OpenAI-compatible server of unknown make: all of them)
RUNTIME_OF_KIND = {"llama-server": "llama-server", "llama-cpp-python": "llama-cpp-python", "ollama": "ollama"}
# how the model check was made (kvedge.server.probe.check_model): these identify the file itself
_IDENTIFYING = ("sha256", "the served file is on this machine", "parameter and vocabulary counts")


def _row(item: str, deployed: object, seen: Setting, ok: bool | None = None) -> ServerCheckRow:
    """`ok` None: judged by equality when the server shows a value."""
    if seen.value is None or seen.provenance in ("unknown", "assumed", "stated", "implied"):
        return ServerCheckRow(item, str(deployed), "unknown", seen.source, "unknown")
    good = (seen.value == deployed) if ok is None else ok
    return ServerCheckRow(item, str(deployed), str(seen.value), seen.source, "ok" if good else "violated")


def _model_row(info: ServerInfo, dep: DeploymentDoc, model: ModelInfo, root: Path) -> tuple[ServerCheckRow, ServerInfo]:
    adapter = dep.adapter.resolve(root) if dep.adapter else None
    try:
        info = check_model(info, model, adapter)
    except ServerError as exc:
        return ServerCheckRow("model", model.path.name, str(info.settings["model"].value), str(exc), "violated"), info
    how = info.facts.get("model_check", "")
    status = "ok" if any(how.startswith(h) for h in _IDENTIFYING) else "unknown"
    return ServerCheckRow("model", model.path.name, str(info.settings["model"].value), how, status), info


def evaluate(info: ServerInfo, dep: DeploymentDoc, root: Path) -> list[ServerCheckRow]:
    """Every row: the model (and adapter), the context, the cache settings, then each precondition."""
    L = dep.launch
    model = inspect_model(dep.model.resolve(root))  # read (and hashed) once: the model check and the preconditions
    model_row, info = _model_row(info, dep, model, root)
    s = info.settings
    rows = [model_row,
            _row("adapter", Path(dep.adapter.path).name if dep.adapter else "none", s["adapter"]),
            # a larger context computes the same for what fits; a smaller one cuts answers
            _row("n_ctx", L.n_ctx, s["n_ctx"], ok=isinstance(s["n_ctx"].value, int) and s["n_ctx"].value >= L.n_ctx),
            _row("type_k", L.type_k, s["type_k"]), _row("type_v", L.type_v, s["type_v"]),
            _row("flash_attn", L.flash_attn, s["flash_attn"])]
    if quantized(L):
        rows.append(_row("rotation", L.rotation, s["rotation"]))
    pre = dep.preconditions or [p.to_dict() for p in preconditions(L, model)]
    runtime = RUNTIME_OF_KIND.get(info.kind)
    for p in pre:
        if p["id"] in ("flash-attention", "rotation") or (runtime and runtime not in p["runtimes"]):
            continue  # the settings above are these two; the others concern another runtime
        rows.append(ServerCheckRow(p["id"], p["requirement"], "unknown",
                                   "not observable from a server" if p["check"] != "doctor"
                                   else "not observable from a server: run `kvedge doctor MODEL` on its device",
                                   "unknown"))
    return rows


def check_server(dep: DeploymentDoc, root: Path, url: str, timeout: float, patience: float) -> ServerCheck:
    """Ask the server at `url` what it is and compare it with the deployment (ServerError: unreachable)."""
    spec = parse_server(url)
    if spec.stated:
        raise ServerError(f"verify --server checks what {spec.url} shows of itself: state nothing (no #...) in "
                          "the URL; deploy.json states the configuration")
    info = probe(spec, timeout, dep.adapter.resolve(root) if dep.adapter else None, patience)
    rows = evaluate(info, dep, root)
    bad = [r.item for r in rows if r.status == "violated"]
    unknown = [r.item for r in rows if r.status == "unknown"]
    if bad:
        line = f"NOT VERIFIED: {info.url} does not run this deployment ({', '.join(bad)} differ from deploy.json)"
    elif unknown:
        line = (f"NOT VERIFIED: {info.url} ({info.kind}) does not show {', '.join(unknown)}; kvedge cannot tell "
                "that it runs this deployment (audit it in process on that device, or with kvedge audit --server)")
    else:
        line = f"VERIFIED: {info.url} shows every setting and precondition of this deployment"
    return ServerCheck(schema=SERVER_CHECK_SCHEMA, kvedge_version=__version__, url=info.url, kind=info.kind,
                       deployment=dep.label, rows=rows, verified=not bad and not unknown, line=line)
