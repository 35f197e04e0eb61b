"""What a server audit adds to report.json: every server with each setting and how kvedge knows it, and
for every run where it ran, who answered, how fast by the servers' own clocks, and how often the server
counted the prompt's tokens as kvedge did (the check that it received the same prompt)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from ..audit.spec import AuditOutcome
from ..stats import wilson
from ..audit.store import Store
from .prepare import ServerAudit

NOT_SCORED = ("not measured: a server gives no per-position distributions to teacher-force (KLD and perplexity "
              "are measured only between in-process runs)")


def _server_speed(speed: dict[str, Any], gens: Sequence, origins: Sequence[dict]) -> dict[str, Any]:
    """The summary's speed of a server run, with the servers' own token counts, and which clock timed it."""
    tokens = sum(int(o.get("completion_tokens") or len(g.tokens)) for g, o in zip(gens, origins))
    seconds = sum(g.seconds for g in gens)
    server_clock = all(o.get("timings") == "server" for o in origins)
    return {**speed, "decode_tokens": tokens, "decode_tokens_per_s": tokens / seconds if seconds else None,
            "prompt_tokens_per_s": speed["prompt_tokens_per_s"] if server_clock else None,
            "clock": "the servers' own timings" if server_clock else
                     "kvedge's wall clock per request (network and queueing included)"}


def annotate(report: dict[str, Any], outcome: AuditOutcome, audit: ServerAudit, store: Store) -> dict[str, Any]:
    """Add `servers`, and per run `where`, `served_by`, `server_settings`, `prompt_tokens_match`."""
    spec = outcome.spec
    by_label = {r.spec.label: r for r in outcome.runs}
    answered: Counter[str] = Counter()
    for entry in report["runs"]:
        run = by_label[entry["label"]]
        if not run.spec.server:
            entry["where"] = "in-process"
            continue
        infos = audit.plan.servers[run.spec]
        gens_all = store.generations(run.key)
        origins_all = store.origins(run.key)
        keys = [(p.id, p.text_sha256) for p in spec.prompts]
        gens = [gens_all[k] for k in keys]
        origins = [origins_all.get(k, {}) for k in keys]
        per_server = Counter(o.get("server", "?") for o in origins)
        answered.update(per_server)
        counted = [o for o in origins if o.get("prompt_tokens_server") is not None]
        entry["where"] = "server"
        entry["served_by"] = {url: per_server.get(url, 0) for url in (i.url for i in infos)}
        entry["server_settings"] = infos[0].to_report()["settings"]
        entry["request"] = ("kvedge's chat template applied, the prompt sent raw" if infos[0].api == "completion"
                            else "chat messages: the server applied its own chat template")
        entry["prompt_tokens_match"] = wilson(
            sum(o["prompt_tokens_server"] == o["prompt_tokens_local"] for o in counted), len(counted)).to_dict()
        entry["retried"] = sum(1 for o in origins if o.get("attempts", 1) > 1)
        entry["speed"] = _server_speed(entry["speed"], gens, origins)
        if entry["kld"]["value"] is None:
            entry["kld_note"] = NOT_SCORED
    ref = next(r for r in outcome.runs if r.spec.is_reference)
    if ref.spec.server:
        report["noise_floor_note"] = None if not report.get("noise_floor") else (
            "the reference is a server and the noise run is in-process: the noise floor measures a change of "
            "arithmetic between them")
    report["servers"] = [{**i.to_report(), "run": next(r.label for r, v in audit.plan.servers.items() if i in v),
                          "answered": answered.get(i.url, 0)} for i in audit.infos]
    return report
