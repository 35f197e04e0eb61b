import math

from kvedge.stats import binom_greater, binom_two_sided, bootstrap, mcnemar_exact, mean, ratio_estimate, wilson


def test_wilson_known_values():
    r = wilson(5, 10)
    assert math.isclose(r.lo, 0.2366, abs_tol=1e-4) and math.isclose(r.hi, 0.7634, abs_tol=1e-4)
    z = wilson(0, 20)
    assert z.lo == 0.0 and math.isclose(z.hi, 0.1611, abs_tol=1e-4)
    assert wilson(0, 0).rate is None


def test_exact_tests():
    assert mcnemar_exact(0, 0) == 1.0
    assert math.isclose(mcnemar_exact(0, 6), 2 / 64)  # both tails of Binomial(6, 1/2)
    assert math.isclose(binom_two_sided(1, 10), 22 / 1024)
    assert math.isclose(binom_greater(5, 5), 1 / 32)
    assert binom_greater(0, 5) == 1.0


def test_bootstrap_is_seeded_and_brackets_the_value():
    xs = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    a, b = bootstrap([xs], mean), bootstrap([xs], mean)
    assert a == b
    assert a.lo <= a.value <= a.hi and a.n == 6


def test_ratio_estimate_pairs_samples():
    r = ratio_estimate([1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert math.isclose(r.value, 0.75)
    assert r.hi <= 1.0 + 1e-12
