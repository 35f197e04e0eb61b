import pytest

from kvedge.errors import TemplateError
from kvedge.template import ChatTemplate


def test_renders_chatml_with_generation_prompt():
    t = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert t.render("hi") == "<user>hi<assistant>"
    assert t.render("hi", system="be kind") == "<system>be kind<user>hi<assistant>"


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ raise_exception('nope') }}",
])
def test_hostile_templates_are_contained(src):
    with pytest.raises(TemplateError):
        ChatTemplate(src).render("hi")


def test_output_cap_stops_a_template_that_floods_memory():
    # Jinja's sandbox caps range() at 100,000 items, so each item writes 100 characters to reach
    # kvedge's own cap (1,000,000 characters) from inside that limit
    with pytest.raises(TemplateError, match="exceeds 1,000,000 characters"):
        ChatTemplate("{% for x in range(100000) %}{{ 'x' * 100 }}{% endfor %}").render("hi")
