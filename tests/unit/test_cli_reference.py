"""docs/reference/cli.md is generated from the Typer app; this fails when the checked-in page is stale."""

from __future__ import annotations

from pathlib import Path

from kvedge.cli.reference import COMMAND, render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "cli.md"


def test_the_command_reference_is_up_to_date():
    assert PAGE.is_file(), f"docs/reference/cli.md is missing: run `{COMMAND}`"
    assert PAGE.read_text(encoding="utf-8") == render(), f"docs/reference/cli.md is stale: run `{COMMAND}`"


def test_the_reference_lists_every_command_and_option():
    import typer.main

    from kvedge.cli import app

    page = render()
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert f"## kvedge {name}\n" in page
        for p in cmd.params:
            if p.param_type_name == "option":
                assert f"`{p.opts[0]}" in page, (name, p.opts)


def test_rendering_is_deterministic():
    assert render() == render()
