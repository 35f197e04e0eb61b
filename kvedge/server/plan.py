"""Which run of the audit each server answers.

Servers with the same settings (`ServerInfo.identity`) form one run and share its queue, so a fleet of
identical devices audits together; servers whose settings differ in anything but their slot count are
different runs, and two of those that would carry the same label are refused rather than mixed. An f16
server is the reference (with `fa=off` stated, the noise run); where no server provides them, the f16
reference and the noise run are computed in this process on the same GGUF, and the report says where
every run ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..audit.spec import RunSpec
from ..errors import ServerError
from ..llama.runtime import F16
from .probe import ServerInfo, describe_change


@dataclass(frozen=True)
class Plan:
    runs: tuple[RunSpec, ...]  # in the order the audit runs them: reference, noise, the rest
    servers: dict[RunSpec, tuple[ServerInfo, ...]]  # who answers each server run


def _run_for(info: ServerInfo) -> RunSpec:
    kv = info.kv
    if kv is None:
        raise ServerError(f"{info.url} ({info.kind}) does not report its KV cache types: state them with "
                          f"--server-kv TYPE or {info.url}#kv=TYPE")
    rotation = info.settings["rotation"].value if kv.quantized else True
    variant = "noise:flash-attn-off" if kv == F16 and info.settings["flash_attn"].value is False else ""
    return RunSpec(kv, rotation, variant, json.dumps(info.identity(), sort_keys=True))


def plan_runs(infos: list[ServerInfo], noise: str | None) -> Plan:
    by_run: dict[RunSpec, list[ServerInfo]] = {}
    for info in infos:
        by_run.setdefault(_run_for(info), []).append(info)
    seen: dict[str, RunSpec] = {}
    for run in by_run:
        other = seen.get(run.label)
        if other is not None:
            a, b = by_run[other][0], by_run[run][0]
            raise ServerError(f"{a.url} and {b.url} both serve {run.label} but differ in "
                              f"{describe_change(a.identity(), b.identity())}: audit them separately "
                              "(results from differently set servers are never mixed)")
        seen[run.label] = run
    served = list(by_run)
    reference = next((r for r in served if r.is_reference), RunSpec(F16, True))
    noise_run = next((r for r in served if r.is_noise), RunSpec(F16, True, f"noise:{noise}") if noise else None)
    rest = [r for r in served if r not in (reference, noise_run)]
    runs = (reference,) + ((noise_run,) if noise_run else ()) + tuple(rest)
    return Plan(runs, {r: tuple(v) for r, v in by_run.items()})
