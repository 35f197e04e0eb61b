"""Chat templates are code from downloaded files: they render in a sandboxed child process, with a
deadline and a memory limit, and what they render depends only on their inputs and a frozen time."""

from __future__ import annotations

import json

import pytest

from support.fakes import write_tiny_gguf
from kvedge.gguf import template as template_mod
from kvedge.errors import TemplateError
from kvedge.gguf.template import ChatTemplate

CHATML = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_renders_chatml_with_generation_prompt():
    t = ChatTemplate(CHATML)
    assert t.render("hi") == "<user>hi<assistant>"
    assert t.render("hi", system="be kind") == "<system>be kind<user>hi<assistant>"


def _attacks(marker) -> dict[str, str]:
    """The CVE-2024-34359 class and its relatives: reach os/subprocess/builtins through globals of the
    objects a Jinja template can name, mutate the caller's data, or read files."""
    cmd = f"touch {marker}"
    return {
        "mro walk to subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "cycler globals to os": f"{{{{ cycler.__init__.__globals__.os.popen('{cmd}').read() }}}}",
        "joiner globals to os": f"{{{{ joiner.__init__.__globals__.os.system('{cmd}') }}}}",
        "namespace globals to os": f"{{{{ namespace.__init__.__globals__.os.system('{cmd}') }}}}",
        "self to builtins": f"{{{{ self.__init__.__globals__.__builtins__.__import__('os').system('{cmd}') }}}}",
        "lipsum globals to os": f"{{{{ lipsum.__globals__['os'].system('{cmd}') }}}}",
        "kvedge's own function": "{{ raise_exception.__globals__ }}",
        "the clock's closure": "{{ strftime_now.__closure__ }}",
        "format string walk": "{{ '{0.__class__.__mro__}'.format(messages) }}",
        "attr filter walk": f"{{{{ (cycler|attr('__init__')|attr('__globals__'))['os'].system('{cmd}') }}}}",
        "mutate the messages": "{{ messages.append({'role': 'system', 'content': 'obey'}) }}",
        "mutate a message": "{% for m in messages %}{{ m.update({'content': 'x'}) }}{% endfor %}",
        "read a file": "{% include '/etc/passwd' %}",
        "import a module": "{% import 'os' as os %}{{ os }}",
        "raise_exception": "{{ raise_exception('nope') }}",
        "does not parse": "{% for %}",
    }


@pytest.mark.parametrize("name", list(_attacks("x")))
def test_injection_is_contained(tmp_path, name):
    """Each attack is an error, or renders nothing: the sandbox answers a bare forbidden attribute with an
    empty undefined value, and anything done with one with an error. No command ever runs."""
    marker = tmp_path / "pwned"
    try:
        out = ChatTemplate(_attacks(marker)[name]).render("hi")
    except TemplateError as exc:
        assert "\n" not in str(exc)
    else:
        assert out == "", out
    assert not marker.exists()


def test_output_cap_stops_a_template_that_floods_memory():
    # Jinja's sandbox caps range() at 100,000 items, so each item writes 100 characters to reach
    # kvedge's own cap (1,000,000 characters) from inside that limit
    with pytest.raises(TemplateError, match="exceeds 1,000,000 characters"):
        ChatTemplate("{% for x in range(100000) %}{{ 'x' * 100 }}{% endfor %}").render("hi")


@pytest.mark.parametrize("src", [
    "{{ 'x' * 10**10 }}",  # ten gigabytes in one expression
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{{ (range(100000)|list) * 100000 }}",  # a list of ten billion items
    "{{ 'ab'|center(10**10) }}",
    "{{ '%0999999999d' % 1 }}",  # a gigabyte of zeros through string formatting
])
def test_memory_bombs_end_in_an_error(src):
    # ended by the sandbox's memory limit, or by its deadline (the message says which); not timed here,
    # which would race the clock on a loaded machine: a bomb that never ended would meet the per-test timeout
    with pytest.raises(TemplateError, match="memory|did not finish"):
        ChatTemplate(src).render("hi")


def test_a_template_that_never_ends_is_stopped(monkeypatch):
    monkeypatch.setattr(template_mod, "RENDER_SECONDS", 3.0)
    src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
    # this message comes only from the deadline's timer, which ends the sandbox: the deadline stopped it
    with pytest.raises(TemplateError, match="did not finish rendering within 3 s"):
        ChatTemplate(src).render("hi")


def test_recursion_is_an_error():
    with pytest.raises(TemplateError, match="recursed|failed"):
        ChatTemplate("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}").render("hi")


def test_a_dated_template_renders_its_frozen_time():
    src = "{{ strftime_now('%d %b %Y') }}" + CHATML
    july = ChatTemplate(src, now="2024-07-01T09:00:00")
    assert july.uses_clock and july.render("hi") == "01 Jul 2024<user>hi<assistant>"
    assert ChatTemplate(src, now="2024-07-01T09:00:00").render("hi") == july.render("hi")
    assert ChatTemplate(src, now="2024-07-02T09:00:00").render("hi") != july.render("hi")
    assert not ChatTemplate(CHATML).uses_clock


def test_no_randomness_reaches_a_rendering():
    with pytest.raises(TemplateError):  # Jinja's lipsum draws random words; it is not offered
        ChatTemplate("{{ lipsum(1) }}").render("hi")


def _gguf_with_template(path, source: str):
    return write_tiny_gguf(path, source)


def test_an_injection_carried_by_a_gguf_is_contained(tmp_path):
    from kvedge.gguf.model import inspect_model
    from kvedge.gguf.template import chat_template_for

    marker = tmp_path / "pwned"
    for src in (_attacks(marker)["cycler globals to os"], _attacks(marker)["self to builtins"]):
        m = inspect_model(_gguf_with_template(tmp_path / "evil.gguf", src))
        with pytest.raises(TemplateError):
            chat_template_for(m).render("hi")
    assert not marker.exists()


def test_an_injection_through_the_cli_is_one_line_and_exit_2(tmp_path):
    """The audit renders every prompt before llama.cpp loads anything: the hostile template is the error."""
    from support.cli import run_cli

    marker = tmp_path / "pwned"
    model = _gguf_with_template(tmp_path / "evil.gguf", _attacks(marker)["cycler globals to os"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    proc = run_cli("audit", str(model), "--prompts", str(prompts), "--kv", "f16", "--noise", "none",
                   "--out", str(tmp_path / "o"), "-q", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvedge: error: chat template") and "Traceback" not in proc.stderr
    assert not marker.exists()
