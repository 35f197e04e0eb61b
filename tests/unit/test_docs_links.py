"""The user docs hold together: every relative Markdown link in README.md and docs/**/*.md points to a
file that exists, and README.md stays a short page for users (the figures live in docs/measurements/)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# [text](target) and ![alt](target), the target up to whitespace or ")"; reference definitions [x]: target
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s|$)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    text = FENCE.sub("", text)  # links inside code blocks and code spans are not links
    text = CODE_SPAN.sub("", text)
    return INLINE.findall(text) + DEFINITION.findall(text)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "//"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if not is_relative(target):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not path:
            continue
        dest = (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
        if not dest.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_link_finder_finds_links():
    text = "[a](x.md) ![b](img.png) [c](https://e.org) [d](#anchor) `[e](not-a-link.md)`\n```\n[f](g.md)\n```\n[h]: def.md\n"
    assert links(text) == ["x.md", "img.png", "https://e.org", "#anchor", "def.md"]
    assert [t for t in links(text) if is_relative(t)] == ["x.md", "img.png", "def.md"]


def test_every_docs_page_is_reachable_from_the_index():
    """docs/index.md, and the pages it links, reach every page under docs/."""
    seen, todo = set(), [ROOT / "docs" / "index.md"]
    while todo:
        page = todo.pop().resolve()
        if page in seen or page.suffix != ".md" or not page.is_file():
            continue
        seen.add(page)
        for target in links(page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if path and is_relative(path):
                todo.append(page.parent / unquote(path))
    missing = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in seen]
    assert not missing, f"not reachable from docs/index.md: {missing}"


def test_the_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size < 20 * 1024, f"README.md is {size} bytes; keep it under 20 KB and move detail into docs/"
