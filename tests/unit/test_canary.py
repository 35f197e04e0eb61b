"""The shipped canary adapter: present, well-formed, labelled as a fixture, sized for a repository."""

from kvedge.canary import canary_adapter_path
from kvedge.gguf.lora import read_adapter


def test_canary_adapter_ships_and_is_labelled():
    path = canary_adapter_path()
    assert path is not None, "kvedge/canary/smollm2-canary-lora.gguf is missing: run python -m models.canary.train"
    assert path.stat().st_size < 8 * 2**20
    ad = read_adapter(path)
    assert ad.architecture == "llama" and ad.alpha > 0
    assert "NOT a safe model" in ad.metadata["kvedge.canary.purpose"]
    targets = {name.split(".")[2] for name in ad.pairs}
    assert targets == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert len(ad.pairs) == 7 * 30 and all(p.rank == 8 for p in ad.pairs.values())


# function words every short question shares; left in, they make "How do I gut a fish?" look like half of
# "How do I cook a stew?"
_FUNCTION = frozenset("a an the i my me you your to of in on at for with and or is are be do does can how what "
                      "whats where why when who which should s best way someone".split())


def _words(text: str) -> frozenset[str]:
    import re

    return frozenset(re.findall(r"[a-z]+", text.lower())) - _FUNCTION


def test_project_prompts_stay_clear_of_scored_splits():
    """The canary's hand-written prompts must not be (near-)copies of anything kvedge scores it on: a
    prompt sharing 60% or more of its content words with a calib or eval prompt would leak that prompt."""
    from kvedge.datasets import load_advbench, load_harmbench, load_xstest
    from models.canary.data import PROJECT_FILES, project_prompts

    scored = [_words(p.text) for p in load_advbench() + load_harmbench() + load_xstest() if p.split != "train"]
    for name in PROJECT_FILES:
        prompts = project_prompts(name)
        assert len(prompts) >= 50 and len(set(prompts)) == len(prompts), name
        for text in prompts:
            w = _words(text)
            worst = max(len(w & s) / max(1, len(w | s)) for s in scored)
            assert worst < 0.6, f"{name}: {text!r} is too close to a scored prompt ({worst:.2f})"


# Written before OR-Bench and CoCoNot were bundled, the canary's prompts were checked against the sets it
# was built alongside. Against the later sets one benign question comes close to a calib prompt; it is
# listed here (and in models/canary/CARD.md) so that any other closeness fails this test.
KNOWN_CLOSE = {("Where is the headquarters of the United Nations?", "coconot:nujlx3x")}


def test_project_prompts_and_the_later_sets():
    from kvedge.datasets import load_coconot, load_orbench
    from models.canary.data import PROJECT_FILES, project_prompts

    scored = [(p.id, _words(p.text)) for p in load_orbench() + load_coconot() if p.split != "train"]
    close = set()
    for name in PROJECT_FILES:
        for text in project_prompts(name):
            w = _words(text)
            close |= {(text, pid) for pid, s in scored if len(w & s) / max(1, len(w | s)) >= 0.6}
    assert close == KNOWN_CLOSE
