"""The one page shell every HTML report shares, and its building blocks.

A report page is a single self-contained file: inline CSS, figures as inline SVG, no script, no
external font, image or link to fetch, so it opens offline, can be mailed or attached to a CI run, and
prints. The layout is one column that narrows to a phone's width: tables scroll sideways inside their
own box, figures scale, answers side by side wrap into a stack. Verdicts are shown in words as well as
colour. Everything interpolated is escaped: prompts and model answers are untrusted text.
"""

from __future__ import annotations

import html
from typing import Iterable, Sequence

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; color: #1a1a1a; background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 60rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.45rem; margin: 0 0 .4rem; line-height: 1.25; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; padding-bottom: .2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
p, li { max-width: 48rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em;
  overflow-wrap: anywhere; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .8rem; background: #f7f7f7; padding: .5rem; }
.meta { margin: 0; padding-left: 1.1rem; color: #333; font-size: .92rem; }
.note { color: #444; font-size: .9rem; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: .84rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .2rem .45rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure.plot { margin: 1rem 0 1.5rem; break-inside: avoid; }
figure.plot svg { display: block; width: 100%; height: auto; max-width: 46rem; }
figcaption { font-size: .86rem; color: #444; max-width: 46rem; }
.flip { border: 1px solid #ddd; border-radius: 6px; padding: .6rem; margin: .8rem 0; break-inside: avoid; }
.prompt { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .9rem; margin: .2rem 0 .5rem; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(16rem, 1fr)); gap: .5rem; }
.answer { border: 1px solid #ccc; border-left-width: 5px; border-radius: 4px; padding: .35rem .5rem; }
.answer .head { font-size: .8rem; font-weight: 600; }
.answer .text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .84rem; margin-top: .2rem; }
.refused { border-left-color: #0072B2; }
.answered { border-left-color: #D55E00; }
.moved { background: #fff8e6; }
.verdict-refused { color: #005a8c; }
.verdict-answered { color: #a84400; }
footer { margin-top: 2.5rem; color: #555; font-size: .82rem; }
@media (max-width: 40rem) { body { font-size: 14px; } main { padding: .6rem; } }
@media print {
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  h2, h3 { break-after: avoid; }
  .scroll { overflow: visible; }
  table { font-size: 8pt; }
  .moved { background: none; }
}
@page { margin: 14mm; }
"""


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def page(title: str, meta: Iterable[str], sections: Iterable[str], footer: str = "") -> str:
    """The whole document. `meta` items and `sections` are HTML already escaped by their builders."""
    items = "".join(f"<li>{m}</li>" for m in meta)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>{esc(title)}</h1><ul class=\"meta\">{items}</ul></header>\n"
        + "\n".join(sections)
        + (f"\n<footer>{footer}</footer>" if footer else "")
        + "\n</main>\n</body>\n</html>\n"
    )


def section(title: str, *parts: str, level: int = 2) -> str:
    return f"<section><h{level}>{esc(title)}</h{level}>\n" + "\n".join(p for p in parts if p) + "\n</section>"


def para(text_html: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{text_html}</p>"


def bullets(items_html: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items_html) + "</ul>"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of plain-text cells (escaped here), in a box that scrolls sideways on narrow screens."""
    head = "".join(f"<th scope=\"col\">{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def figure(svg: str, name: str, caption_html: str) -> str:
    """A plot: the browser test counts `figure.plot` elements holding an `svg`."""
    return f"<figure class=\"plot\" id=\"fig-{esc(name)}\">{svg}<figcaption>{caption_html}</figcaption></figure>"


def verdict_word(refused: bool) -> str:
    return "refused" if refused else "answered"


def answer_box(label: str, refused: bool, rule: str, text: str, moved: bool) -> str:
    """One configuration's answer to a prompt, its verdict in words and colour, and the rule that fired."""
    word = verdict_word(refused)
    return (f"<div class=\"answer {word}{' moved' if moved else ''}\">"
            f"<div class=\"head\">{esc(label)}: <span class=\"verdict-{word}\">{word}</span>"
            f"{' (differs from f16)' if moved else ''} <code>{esc(rule)}</code></div>"
            f"<div class=\"text\">{esc(text) if text.strip() else '<em>(empty answer)</em>'}</div></div>")
