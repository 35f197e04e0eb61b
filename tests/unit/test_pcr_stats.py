"""PCR statistics on constructed tensors whose answers are known."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from kvedge.pcr import stats as st  # noqa: E402


def _hidden(n_layer=6, d=16, n=10, seed=0, signal_layer=4, strength=5.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_layer, 2 * n, d, generator=g)
    harmful = torch.tensor([True] * n + [False] * n)
    h[signal_layer, :n, 0] += strength  # harmful prompts sit further along axis 0 at one layer
    return h, harmful


def test_directions_find_the_planted_signal() -> None:
    h, harmful = _hidden()
    dirs = st.directions(h, harmful)
    assert dirs.readout == 4
    assert abs(float(dirs.r[4, 0])) > 0.9
    assert dirs.gap > 3.0
    assert dirs.separation[4] > 3.0
    assert torch.allclose(dirs.r.norm(dim=-1), torch.ones(6))


def test_readout_ignores_the_first_third() -> None:
    h, harmful = _hidden(signal_layer=1, strength=50.0)
    assert st.directions(h, harmful).readout >= 2


def test_damage_is_the_erased_share_of_the_gap() -> None:
    harmful = torch.tensor([True, True, False, False])
    s_ref = torch.tensor([4.0, 6.0, 0.0, 0.0])
    assert st.damage(s_ref, s_ref, harmful, 5.0).value == 0.0
    assert st.damage(s_ref, s_ref - 2.5, harmful, 5.0).value == pytest.approx(0.5)
    assert st.damage(s_ref, s_ref + 5.0, harmful, 5.0).value == pytest.approx(-1.0)  # toward refusal


def test_margin_and_kld() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0]])
    assert float(st.margin(logits, [0], [1, 2])) == pytest.approx(2.0 - math.log(2.0))
    assert float(st.kld(logits, logits)) == pytest.approx(0.0, abs=1e-12)
    assert float(st.kld(logits, torch.zeros(1, 4))) > 0


def test_amplification_of_an_error_along_r_vs_isotropic() -> None:
    g = torch.Generator().manual_seed(1)
    d = 64
    h = torch.randn(50, d, generator=g) * 3
    r = torch.zeros(d)
    r[0] = 1.0
    along = h.clone()
    along[:, 0] += 0.5
    iso = h + torch.randn(50, d, generator=g) * (0.5 / math.sqrt(d))
    a_along, a_iso = st.amplification(h, along, r, 2.0), st.amplification(h, iso, r, 2.0)
    assert a_along.directional > 5.0
    assert 0.5 < a_iso.directional < 2.0
    assert st.amplification(h, h, r, 2.0) is None


def test_pcr_value() -> None:
    assert st.pcr_value(0.1, 0.4, 0.01) == pytest.approx(0.75)
    assert st.pcr_value(0.8, 0.4, 0.01) == -1.0  # clipped
    assert st.pcr_value(0.0, 0.005, 0.01) is None  # below the floor: undefined


def test_outliers_importance_overlap() -> None:
    rows = torch.ones(8, 32)
    rows[:, 5] = 10.0  # one outlier channel
    out = st.outlier_channels(rows)
    assert out.tolist() == [c == 5 for c in range(32)]
    grads = torch.zeros(8, 32)
    grads[:, 5] = 1.0
    assert st.overlap(st.importance(rows, grads), out) == pytest.approx(1.0)
    grads = torch.zeros(8, 32)
    grads[:, 6] = 1.0
    assert st.overlap(st.importance(rows, grads), out) == 0.0


def test_concentration_and_recovery() -> None:
    single = {0: 0.1, 1: 0.5, 2: 0.0, 3: 0.3, 4: 0.1, 5: -0.2}
    top = st.top_layers(single, 3)
    assert top == [1, 3, 0]
    assert st.concentration_share(single, top) == pytest.approx(0.9 / 1.0)
    assert st.recovery(0.4, 0.1) == pytest.approx(0.75)
    assert st.recovery(0.0, 0.1) is None


def test_spearman_with_ties() -> None:
    assert st.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert st.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert st.spearman([1, 1, 2], [5, 5, 6]) == pytest.approx(1.0)
    assert st.spearman([1, 2], [1, 2]) is None


def test_weighted_mean_skips_undefined_and_negative_weights() -> None:
    assert st.weighted_mean([1.0, None, 0.0], [1.0, 5.0, 3.0]) == pytest.approx(0.25)
    assert st.weighted_mean([1.0], [-1.0]) is None
