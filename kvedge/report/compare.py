"""Terminal rendering of a comparison of two audits (`kvedge compare`)."""

from __future__ import annotations

from typing import Any

from .fmt import rate


def _where(side: dict[str, Any]) -> str:
    servers = side.get("servers")
    return f"{side['path']} ({side['backend']}" + (f"; servers {', '.join(servers)})" if servers else ")")


def render_comparison(result: dict[str, Any]) -> str:
    out = [f"A: {_where(result['a'])}   B: {_where(result['b'])}",
           f"{result['common_prompts']} prompts in common"]
    for r in result["rows"]:
        line = (f"{r['config']:<22} {r['prompts']:<8} agreement {rate(r['agreement'])}; refused only in A "
                f"{r['refused_only_in_a']}, only in B {r['refused_only_in_b']}, McNemar p={r['mcnemar_p']:.3g}")
        if "vs_noise_of_a" in r:
            line += f"; {r['vs_noise_of_a']['verdict']}"
        out.append(line)
    return "\n".join(out)
