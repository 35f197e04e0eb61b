"""What a server audit adds to report.json: every server with each setting and how kvedge knows it, and
for every run where it ran, who answered, how fast by the servers' own clocks, how often the server
counted the prompt's tokens as kvedge did (the check that it received the same prompt), and where its
first-token refusal margins came from."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

from ..audit.spec import AuditOutcome
from ..audit.store import Store
from ..results.audit import AuditReport, Speed
from ..stats import wilson
from .flavors import TOP_LOGPROBS
from .prepare import ServerAudit

NOT_SCORED = ("not measured: a server gives no per-position distributions to teacher-force (KLD and perplexity "
              "are measured only between in-process runs)")


def _server_speed(speed: Speed, gens: Sequence, origins: Sequence[dict]) -> Speed:
    """The summary's speed of a server run, with the servers' own token counts, and which clock timed it."""
    tokens = sum(int(o.get("completion_tokens") or len(g.tokens)) for g, o in zip(gens, origins))
    seconds = sum(g.seconds for g in gens)
    server_clock = all(o.get("timings") == "server" for o in origins)
    return dataclasses.replace(
        speed, decode_tokens=tokens, decode_tokens_per_s=tokens / seconds if seconds else None,
        prompt_tokens_per_s=speed.prompt_tokens_per_s if server_clock else None,
        clock="the servers' own timings" if server_clock else
              "kvedge's wall clock per request (network and queueing included)")


def _margin_note(gens: Sequence, origins: Sequence[dict]) -> str:
    """Where a server run's margins came from (each answer's origin records its log-probabilities), or why
    it has none. Prompts beyond the server's context have no answer, and are not counted."""
    answered = [(g, o) for g, o in zip(gens, origins) if g.stop_reason != "ctx"]
    gens, origins = [g for g, _ in answered], [o for _, o in answered]
    given = [g for g, o in answered if str(o.get("logprobs", "")).startswith("top-")]
    refused = sorted({o["logprobs"].split(": ", 1)[1] for o in origins
                      if str(o.get("logprobs", "")).startswith("refused: ")})
    why = (f"the server refused them ({'; '.join(refused)})" if refused
           else "the server gave none" if any(o.get("logprobs") == "none given" for o in origins)
           else "none were asked for (answers stored before, or a vocabulary without opening tokens)")
    if not given:
        return f"not available: no answer came with log-probabilities; {why}"
    read = sum(g.margin is not None for g in given)
    note = (f"from the top-{TOP_LOGPROBS} log-probabilities of each answer's first token (opening tokens below "
            f"the {TOP_LOGPROBS}th not counted): {read} of {len(given)} such answers had a refusal and a "
            "compliance opening among them")
    return note + (f"; {len(gens) - len(given)} answers came without log-probabilities: {why}"
                   if len(given) < len(gens) else "")


def annotate(report: AuditReport, outcome: AuditOutcome, audit: ServerAudit, store: Store) -> AuditReport:
    """The report with `servers`, and per run `where`, `served_by`, `server_settings`, `prompt_tokens_match`."""
    spec = outcome.spec
    by_label = {r.spec.label: r for r in outcome.runs}
    answered: Counter[str] = Counter()
    runs = []
    for entry in report.runs:
        run = by_label[entry.label]
        if not run.spec.server:
            runs.append(dataclasses.replace(entry, where="in-process"))
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
        runs.append(dataclasses.replace(
            entry,
            speed=_server_speed(entry.speed, gens, origins),
            where="server",
            served_by={url: per_server.get(url, 0) for url in (i.url for i in infos)},
            server_settings=infos[0].to_report()["settings"],
            request=("kvedge's chat template applied, the prompt sent raw" if infos[0].api == "completion"
                     else "chat messages: the server applied its own chat template"),
            prompt_tokens_match=wilson(sum(o["prompt_tokens_server"] == o["prompt_tokens_local"] for o in counted),
                                       len(counted)),
            retried=sum(1 for o in origins if o.get("attempts", 1) > 1),
            kld_note=NOT_SCORED if entry.kld.value is None else None,
            margin_note=_margin_note(gens, origins),
        ))
    ref = next(r for r in outcome.runs if r.spec.is_reference)
    note = None
    if ref.spec.server and report.noise_floor:
        note = ("the reference is a server and the noise run is in-process: the noise floor measures a change of "
                "arithmetic between them")
    servers = [{**i.to_report(), "run": next(r.label for r, v in audit.plan.servers.items() if i in v),
                "answered": answered.get(i.url, 0)} for i in audit.infos]
    return dataclasses.replace(report, runs=runs, servers=servers, noise_floor_note=note)
