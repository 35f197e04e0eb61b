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
    "{% for x in range(10**9) %}{{ 'x' * 100 }}{% endfor %}",
])
def test_hostile_templates_are_contained(src):
    with pytest.raises(TemplateError):
        ChatTemplate(src).render("hi")
