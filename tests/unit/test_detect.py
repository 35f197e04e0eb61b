import pytest

from kvedge.detectors.keyword import KeywordDetector, normalise

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


# --- phrase lists from a file (--refusal-phrases, keyword:FILE) -------------------------------------

from kvedge.detectors.keyword import REFUSAL_PHRASES, REFUSAL_PREFIXES  # noqa: E402
from kvedge.detectors import make_detector  # noqa: E402
from kvedge.detectors.phrases import parse_phrases  # noqa: E402
from kvedge.errors import DetectorError  # noqa: E402


def test_phrase_file_extends_the_lists_and_changes_the_id(tmp_path):
    f = tmp_path / "phrases.txt"
    f.write_text("# ours\nprefix: Nope\nphrase: NOT GONNA ‘happen’\n")
    det = make_detector("keyword", refusal_phrases=f)
    assert det.prefixes[: len(REFUSAL_PREFIXES)] == REFUSAL_PREFIXES and det.prefixes[-1] == "nope"
    assert det.phrases[-1] == "not gonna 'happen'"
    assert det.detect("q", "Nope, not today.").rule == "prefix:nope"
    assert det.detect("q", "Well... that is not gonna ’happen’, friend.").rule == "phrase:not gonna 'happen'"
    assert det.detect("q", "I'm sorry, no.").refused  # the built-in lists still apply
    assert det.id.startswith("keyword-v1-") and det.id != KeywordDetector().id
    assert make_detector(f"keyword:{f}").id == det.id  # the same file by spec: the same detector


def test_phrase_file_replaces_the_lists(tmp_path):
    det = parse_phrases("mode: replace\nphrase: declined\n")
    assert det.prefixes == () and det.phrases == ("declined",)
    assert not det.detect("q", "I'm sorry, I cannot help.").refused
    assert det.detect("q", "Request declined.").refused
    # two different lists never share an id; the built-in lists written out keep the built-in id
    assert parse_phrases("mode: replace\nphrase: refused\n").id != det.id
    builtin = "mode: replace\n" + "".join(f"prefix: {p}\n" for p in REFUSAL_PREFIXES) + "".join(
        f"phrase: {p}\n" for p in REFUSAL_PHRASES)
    assert parse_phrases(builtin).id == "keyword-v1"


@pytest.mark.parametrize("text, needle", [
    ("", "no `prefix:` or `phrase:` rule"),
    ("# only a comment\n", "no `prefix:` or `phrase:` rule"),
    ("prefx: sorry\n", ":1: write `prefix: TEXT`"),
    ("just a phrase\n", ":1: write `prefix: TEXT`"),
    ("phrase: a\nmode: replace\n", ":2: `mode:` takes extend or replace and comes before any rule"),
    ("mode: sideways\n", "`mode:` takes extend or replace"),
    ("prefix:   \n", ":1: empty prefix"),
])
def test_bad_phrase_files_say_where(text, needle):
    with pytest.raises(DetectorError) as exc:
        parse_phrases(text, "p.txt")
    assert needle in str(exc.value)


def test_detector_specs_are_checked(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        make_detector("keyword", refusal_phrases=tmp_path / "missing.txt")
    with pytest.raises(DetectorError, match="does not apply to 'judge:x.gguf'"):
        make_detector("judge:x.gguf", refusal_phrases=tmp_path / "p.txt")
    with pytest.raises(DetectorError, match="judge needs a model"):
        make_detector("judge")
    with pytest.raises(DetectorError, match="judge model not found"):
        make_detector(f"judge:{tmp_path / 'none.gguf'}")
    with pytest.raises(DetectorError, match="strictly between 0 and 1"):
        make_detector("judge:default@1.5")
    with pytest.raises(Exception, match="unknown detector 'oracle'"):
        make_detector("oracle")
    assert KeywordDetector().detect("q", "Fine.").score is None
