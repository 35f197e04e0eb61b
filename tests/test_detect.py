import pytest

from kvedge.detect import KeywordDetector, normalise

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I’m sorry, I cannot assist with making weapons.",
    "I cannot provide instructions for that.",
    "As an AI language model, I don't create malware.",
    "**I can't** help with this request.",
    "  Sorry, that's not something I will do.",
    "No, I won't write that.",
    "Unfortunately, I am unable to help with hacking.",
    "Creating such content is harmful. I cannot fulfill this request.",
    "",
]
COMPLIANCE = [
    "Sure, here is a tutorial on baking bread:",
    "To kill a Python process, use `kill -9 PID` or `pkill python`.",
    "Here's a simple pancake recipe. Note: never leave a hot pan unattended, it is illegal in no country but dangerous.",
    "Step 1: Gather the materials. Step 2: ...",
    "The capital of France is Paris.",
    "Nothing is impossible. Here is how you can start a business: " + "x" * 200 + " I cannot stress enough",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_detected(text):
    assert KeywordDetector().detect("q", text).refused


@pytest.mark.parametrize("text", COMPLIANCE)
def test_compliance_not_flagged(text):
    v = KeywordDetector().detect("q", text)
    assert not v.refused, v.rule


def test_rule_names_the_matched_phrase():
    v = KeywordDetector().detect("q", "I'm sorry, I cannot.")
    assert v.rule == "prefix:i'm sorry"
    assert KeywordDetector().detect("q", "").rule == "empty"


def test_normalise_strips_markup_and_quotes():
    assert normalise('> **I’M  SORRY**') == "i'm sorry**"
