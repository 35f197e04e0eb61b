"""The command reference, generated from the Typer app: `python -m kvedge.cli.reference > docs/reference/cli.md`.

It walks the Click command Typer builds (`typer.main.get_command(app)`) and writes, for each command in
the order the app registers them, its help, its usage, and a table of its arguments and options with
their defaults. The output depends on nothing but the app (no terminal width, no environment), so
tests/unit/test_cli_reference.py can regenerate it and fail when the checked-in page is stale.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer.main
from typer import _click

from .app import app, main

COMMAND = "python -m kvedge.cli.reference > docs/reference/cli.md"


def _text(s: str | None) -> str:
    """Help text as one Markdown line: whitespace collapsed, HTML and table syntax escaped."""
    s = re.sub(r"\s+", " ", s or "").strip()
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(s: str) -> str:
    return f"`{s}`".replace("|", "\\|")


def _is_flag(p: Any) -> bool:
    return bool(getattr(p, "is_flag", False))


def _name_cell(p: Any, ctx: Any) -> str:
    if p.param_type_name == "argument":
        return _code(f"{p.name.upper()} {p.display_type(ctx)}")
    value = "" if _is_flag(p) else f" {p.display_type_rich(ctx)}"
    names = [_code(p.opts[0] + value)] + [_code(o) for o in p.opts[1:]]
    return ", ".join(names)


def _default_cell(p: Any) -> str:
    if p.required:
        return "required"
    d = p.default
    if _is_flag(p):
        return "on" if d else "off"
    if d is None or d == [] or d == ():
        return ""
    if isinstance(d, (list, tuple)):
        return ", ".join(_code(str(x)) for x in d)
    return _code(str(d))


def _usage(name: str, sub: Any, ctx: Any) -> str:
    pieces = [f"kvedge {name}", "[OPTIONS]"]
    for p in sub.get_params(ctx):
        if p.param_type_name == "argument":
            arg = p.name.upper() + ("..." if p.nargs != 1 else "")
            pieces.append(arg if p.required else f"[{arg}]")
    return " ".join(pieces)


def _anchor(name: str) -> str:
    """The anchor GitHub and most renderers give the heading `## kvedge NAME`."""
    return f"kvedge-{name}"


def render() -> str:
    group = typer.main.get_command(app)
    root = _click.Context(group, info_name="kvedge")
    names = group.list_commands(root)
    out = [
        "# Command reference",
        "",
        f"<!-- Generated from the Typer app by `{COMMAND}`; do not edit by hand. -->",
        "",
        _text(group.help),
        "",
        f"Every command: `kvedge COMMAND --help` prints the same. {_text(main.__doc__)} "
        "More in [exit codes](exit-codes.md).",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    for name in names:
        out.append(f"| [`{name}`](#{_anchor(name)}) | {_text(group.commands[name].help)} |")
    for name in names:
        sub = group.commands[name]
        ctx = _click.Context(sub, info_name=name, parent=root)
        params = [p for p in sub.get_params(ctx) if not p.hidden and p.name != "help"]
        out += [
            "",
            f"## kvedge {name}",
            "",
            _text(sub.help),
            "",
            "```",
            _usage(name, sub, ctx),
            "```",
            "",
            "| argument or option | default | meaning |",
            "| --- | --- | --- |",
        ]
        for p in params:
            out.append(f"| {_name_cell(p, ctx)} | {_default_cell(p)} | {_text(p.help)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
