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


def _texts():
    import random

    rng = random.Random(0)
    pieces = REFUSALS + COMPLIANCE + ["  **Note:**", "I'm", " sorry", "\u2019", "cannot help", "x" * 170,
                                      "  \n\n ", "Sure", "i am unable to do that"]
    yield from REFUSALS + COMPLIANCE
    for _ in range(300):
        yield "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))


def test_a_final_verdict_never_changes_as_the_answer_goes_on():
    """Where `final` says stop, the verdict on the cut answer is the verdict on the whole answer: the
    audit stops generating there, so any mismatch would change a reported verdict."""
    det = KeywordDetector()
    cuts = 0
    for text in _texts():
        whole = det.detect("q", text).refused
        for i in range(len(text) + 1):
            if det.final(text[:i]):
                cuts += 1
                assert det.detect("q", text[:i]).refused == whole, (text[:i], text)
    assert cuts > 1000  # the property was exercised, on refusals and answers alike


def test_final_waits_for_the_opening_window():
    det = KeywordDetector()
    assert not det.final("") and not det.final("Sure, here")
    assert det.final("I'm sorry, but I can't help with that request.")
    answer = "Here is a long and helpful answer. " * 6
    first = next(i for i in range(len(answer) + 1) if det.final(answer[:i]))
    assert first >= 160
