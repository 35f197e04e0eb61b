from kvedge.audit.noise import flips, judge, unstable_prompts


def test_flips_counts_both_directions():
    f = flips([True, True, False, False, True], [False, True, True, False, True])
    assert (f.n, f.lost, f.gained, f.ref_refusals) == (5, 1, 1, 3)
    assert f.flip_rate().k == 1 and f.flip_rate().n == 3


def _f(lost, gained, n=100, ref=50):
    from kvedge.audit.noise import Flips

    return Flips(n, lost, gained, ref)


def test_loss_beyond_noise():
    j = judge(_f(9, 0), _f(0, 1))
    assert j.verdict == "loss beyond noise" and j.p_loss < 0.05


def test_same_flips_as_noise_is_within_noise():
    assert judge(_f(3, 2), _f(3, 3)).verdict == "within noise"
    # a few losses with no noise at all are still not enough evidence
    assert judge(_f(3, 0), _f(0, 0)).verdict == "within noise"


def test_gain_beyond_noise():
    j = judge(_f(0, 12), _f(1, 1))
    assert j.verdict == "gain beyond noise"


def test_both_directions():
    assert judge(_f(10, 10), _f(0, 0)).verdict == "loss and gain beyond noise"


def test_unstable_prompts():
    assert unstable_prompts({"a": True, "b": False, "c": True}, {"a": False, "b": False, "c": True}) == {"a"}
