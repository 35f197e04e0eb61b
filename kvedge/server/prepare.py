"""Everything a server audit needs before it runs: each server asked what it is, checked against the
audited GGUF and against what the store recorded of it, and the audit's runs planned around them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..audit.store import Store
from ..datasets import Prompt
from ..errors import ServerError
from ..gguf.model import ModelInfo
from ..gguf.template import ChatTemplate
from ..llama.runtime import RuntimeFactory, RuntimeOptions
from .plan import Plan, plan_runs
from .probe import PROBE_PATIENCE, ServerInfo, check_model, describe_change, probe
from .runtime import ServerRuntimes
from .spec import ServerSpec


@dataclass(frozen=True)
class ServerAudit:
    infos: tuple[ServerInfo, ...]
    plan: Plan
    runtimes: ServerRuntimes


def check_store(store_path: Path, infos: Sequence[ServerInfo]) -> None:
    """Refuse a server whose settings differ from what this audit directory recorded for its URL; record
    the ones seen for the first time."""
    with Store(store_path) as store:
        for info in infos:
            before = store.server_identity(info.url)
            if before is not None and before != info.identity():
                raise ServerError(f"server {info.url} is not what {store_path} recorded for it "
                                  f"({describe_change(before, info.identity())}): audit it into another --out, "
                                  "or restore its settings")
        for info in infos:
            store.put_server(info.url, info.identity())


def chat_messages(prompts: Sequence[Prompt], template: ChatTemplate, system: str | None) -> dict[str, list[dict]]:
    """Each prompt's templated text -> the same prompt as chat messages (for servers that take only those)."""
    out = {}
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p.text}]
        out[template.render(p.text, system)] = messages
    return out


def prepare(specs: Sequence[ServerSpec], model: ModelInfo, adapter: Path | None, prompts: Sequence[Prompt],
            template: ChatTemplate, system: str | None, noise: str | None, base: RuntimeOptions,
            local: RuntimeFactory, store_path: Path, timeout: float, patience: float) -> ServerAudit:
    infos = tuple(check_model(probe(s, timeout, adapter, min(patience, PROBE_PATIENCE)), model, adapter)
                  for s in specs)
    plan = plan_runs(list(infos), noise)
    check_store(store_path, infos)
    runtimes = ServerRuntimes(plan, specs, model, adapter, chat_messages(prompts, template, system), base, local,
                              timeout, patience)
    return ServerAudit(infos, plan, runtimes)
