"""The classic story's claims, measured: expected values hand-derived from each formula."""

from __future__ import annotations

import math

import pytest
import torch

import posenc
from posenc import analysis
from posenc.analysis.probe import Probe
from posenc.base import PositionalEncoding


# -- toy encodings written out longhand: the generic measures checked apart from the registry --
class ToyRope(PositionalEncoding):
    """Half-layout RoPE written out longhand: pair (i, i + d/2) rotates by pos * theta_i."""

    name = "toy-rope"
    family = "rotary"

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.thetas = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def _rot(self, x, positions):
        ang = positions.double()[:, None] * self.thetas  # [s, d/2]
        cos, sin = ang.cos().float(), ang.sin().float()
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def rotate(self, q, k, q_positions, k_positions):
        return self._rot(q, q_positions), self._rot(k, k_positions)


class ToyAlibi(PositionalEncoding):
    """-slope_h * |m - n| with slopes 2^-1, 2^-2, ..."""

    name = "toy-alibi"
    family = "bias"

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.slopes = 2.0 ** -torch.arange(1, num_heads + 1, dtype=torch.float32)

    def bias(self, q_positions, k_positions, *, q=None, k=None):
        dist = (q_positions[:, None] - k_positions[None, :]).abs().float()  # [s_q, s_k]
        return -self.slopes[:, None, None] * dist  # [h, s_q, s_k]


def toy_probe(pe, dim=32, num_heads=2):
    return Probe(name=pe.name, pe=pe.eval(), dim=dim, num_heads=num_heads, causal=False)


# -- magnitude --------------------------------------------------------------------------------
def test_integer_magnitude_grows_linearly():
    probe = analysis.build("integer", dim=16, num_heads=2)
    m = analysis.magnitude(probe, horizon=100)
    # PE(p) = p in all 16 dimensions: |PE(p)| = 4 p exactly.
    assert torch.equal(m.norms, 4.0 * torch.arange(100, dtype=torch.float64))
    assert m.growth == pytest.approx(4.0)
    assert m.token_norm == pytest.approx(4.0)  # unit-variance token of dim 16
    assert m.max_ratio == pytest.approx(99.0)  # position 99 is 99x a token's norm


def test_sinusoidal_magnitude_is_constant():
    m = analysis.magnitude(analysis.build("sinusoidal", dim=16, num_heads=2), horizon=64)
    # sin^2 + cos^2 = 1 per pair: |PE(p)| = sqrt(dim / 2) = sqrt(8) at every position.
    assert torch.allclose(m.norms, torch.full((64,), math.sqrt(8.0), dtype=torch.float64), atol=1e-6)
    assert abs(m.growth) < 1e-6


# -- length dependence ------------------------------------------------------------------------
def test_normalized_changes_with_length():
    probe = analysis.build("normalized", dim=16, num_heads=2)
    ld = analysis.length_dependence(probe, lengths=(16, 128))
    # Position 15 is 15/15 = 1 at L=16 and 15/127 at L=128, in each of 16 dims.
    assert ld.vector_change == pytest.approx(4.0 * (1 - 15 / 127), rel=1e-6)
    assert ld.score_change > 0.1


@pytest.mark.parametrize("name", ["integer", "binary", "sine", "sinusoidal", "learned", "none"])
def test_other_absolute_encodings_do_not_change_with_length(name):
    ld = analysis.length_dependence(analysis.build(name, dim=16, num_heads=2, max_len=128), lengths=(16, 64, 128))
    assert ld.vector_change == 0.0
    assert ld.score_change == 0.0


# -- continuity -------------------------------------------------------------------------------
def test_binary_has_the_largest_step():
    c = analysis.continuity(analysis.build("binary", dim=16, num_heads=2), horizon=256)
    # 127 -> 128 flips 8 bits: |step| = sqrt(8); every even p flips one bit, so the median is 1.
    assert c.argmax == 127
    assert c.max_step == pytest.approx(math.sqrt(8))
    assert c.median_step == pytest.approx(1.0)
    assert c.ratio == pytest.approx(math.sqrt(8))
    for other in ("integer", "normalized", "sine", "sinusoidal", "learned"):
        assert (
            analysis.continuity(analysis.build(other, dim=16, num_heads=2, max_len=256), horizon=256).ratio < c.ratio
        ), other


def test_sinusoidal_steps_are_all_equal():
    # |PE(p+1) - PE(p)|^2 = sum_i 2 - 2 cos(w_i): the same for every p.
    c = analysis.continuity(analysis.build("sinusoidal", dim=16, num_heads=2), horizon=128)
    w = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert c.max_step == pytest.approx(float((2 - 2 * w.cos()).sum().sqrt()), rel=1e-5)
    assert c.ratio == pytest.approx(1.0, abs=1e-4)


# -- uniqueness -------------------------------------------------------------------------------
@pytest.mark.parametrize(("dim", "min_period", "ratio", "period"), [(4, 4, 2, 32), (3, 3, 3, 27), (2, 5, 2, 10)])
def test_sine_repeats_with_its_longest_period(dim, min_period, ratio, period):
    probe = analysis.build("sine", dim=dim, num_heads=1, params=dict(min_period=min_period, ratio=ratio))
    u = analysis.uniqueness(probe, horizon=100)
    assert u.period == period  # min_period * ratio ** (dim - 1)
    assert u.min_distance == pytest.approx(0.0, abs=1e-6)
    assert not u.unique


def test_sinusoidal_is_unique_within_its_horizon():
    dim, horizon = 16, 512
    u = analysis.uniqueness(analysis.build("sinusoidal", dim=dim, num_heads=2), horizon=horizon)
    # |PE(m) - PE(n)|^2 = sum_i 2 - 2 cos((m - n) w_i): the minimum over distances 1..H-1.
    w = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    r = torch.arange(1, horizon, dtype=torch.float64)[:, None]
    expected = (2 - 2 * (r * w).cos()).sum(-1).sqrt().min()
    assert u.min_distance == pytest.approx(float(expected), rel=1e-4)
    assert u.min_distance > 0.5
    assert u.period is None and u.unique


def test_binary_and_integer_are_unique():
    assert analysis.uniqueness(analysis.build("binary", dim=16, num_heads=2), 256).min_distance == 1.0  # one bit apart
    assert analysis.uniqueness(analysis.build("integer", dim=16, num_heads=2), 256).min_distance == pytest.approx(4.0)


# -- relative-ness ----------------------------------------------------------------------------
def test_toy_rope_and_alibi_are_relative_and_absolute_ones_are_not():
    assert analysis.relativeness(toy_probe(ToyRope(16))).deviation < 1e-5
    assert analysis.relativeness(toy_probe(ToyAlibi(2))).deviation < 1e-6
    assert analysis.relativeness(analysis.build("none", dim=32, num_heads=2)).deviation == 0.0
    for name in ("integer", "sinusoidal", "binary", "learned"):
        assert analysis.relativeness(analysis.build(name, dim=32, num_heads=2)).deviation > 0.3, name


@pytest.mark.parametrize("name", ["rope", "alibi", "t5", "xpos", "kerple", "fire", "sandwich"])
def test_registered_relative_encodings_depend_only_on_distance(name):
    for causal in (False, True):
        probe = analysis.build(name, dim=32, num_heads=2, causal=causal)
        assert analysis.relativeness(probe, 32).deviation < 1e-4, (name, causal)


# -- distance profile -------------------------------------------------------------------------
def test_roformer_bound_hand_values():
    r = torch.arange(50)
    assert torch.allclose(analysis.roformer_bound(torch.tensor([0.3]), r), torch.ones(50, dtype=torch.float64))
    a, b = 1.0, 0.2
    # S_1 = e^{ira}, S_2 = e^{ira} + e^{irb}: bound = (1 + 2 |cos(r (a - b) / 2)|) / 3.
    expected = (1 + 2 * (r.double() * (a - b) / 2).cos().abs()) / 3
    assert torch.allclose(analysis.roformer_bound(torch.tensor([b, a]), r), expected)


def test_rope_bound_decays_but_mean_score_does_not():
    prof = analysis.distance_profile(toy_probe(ToyRope(64), dim=128, num_heads=2), 512, draws=256)
    assert prof.bound is not None
    assert prof.bound[0] == pytest.approx(1.0)
    # The bound decays (head_dim 64: below 0.5 past distance 32, below 0.45 past 128) ...
    assert float(prof.bound[32:].max()) < 0.5 and float(prof.bound[128:].max()) < 0.45
    scale = float(prof.mean_abs_score.mean())
    assert float(prof.mean_score.abs().max()) < 0.2 * scale  # ... the mean of random q.k is ~0 everywhere
    assert float(prof.mean_abs_score.max() / prof.mean_abs_score.min()) < 1.3  # and |q.k| does not decay
    # q = k = ones shows RoFormer's picture: largest at distance 0.
    assert int(prof.ones_score.argmax()) == 0


def test_rotation_pairs_recovers_half_layout_frequencies():
    rope = ToyRope(8)
    pairs = analysis.rotation_pairs(toy_probe(rope, dim=16, num_heads=2))
    assert [(i, j) for i, j, _, _ in pairs] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert torch.allclose(torch.tensor([a for *_, a, _ in pairs]), rope.thetas.float(), atol=1e-6)
    assert all(g == pytest.approx(1.0) for *_, g in pairs)


# -- beyond the trained length ----------------------------------------------------------------
def test_learned_errors_past_max_len():
    b = analysis.beyond(analysis.build("learned", dim=16, num_heads=2, max_len=128), train_length=128, horizon=256)
    assert b.error is not None and "max_len=128" in b.error
    assert b.unseen_distance is None


def test_sine_past_its_period_is_nothing_new_and_sinusoidal_is_new():
    b = analysis.beyond(analysis.build("sine", dim=4, num_heads=1), train_length=64, horizon=200)
    assert b.max_unseen == pytest.approx(0.0, abs=1e-5)  # period 32 < 64: every vector was seen
    # 32 positions per period, but PE(16) = PE(0) = 0 (16 is a multiple of every half
    # period 2, 4, 8, 16): 31 distinct vectors, all present by position 31.
    assert b.saturation == 31 and int(b.distinct[-1]) == 31
    s = analysis.beyond(analysis.build("sinusoidal", dim=16, num_heads=2), train_length=64, horizon=200)
    assert s.max_unseen > 0.5 and s.saturation is None


def test_bias_saturation_counts_distinct_values():
    b = analysis.beyond(toy_probe(ToyAlibi(2)), train_length=32, horizon=64)
    assert b.saturation is None  # alibi: every distance is a new value
    assert torch.equal(b.distinct, torch.arange(1, 65))


def test_t5_saturates_beyond_max_distance():
    probe = analysis.build("t5", dim=32, num_heads=2, causal=True)
    max_distance = next(v for k, v in probe.pe.params.asdict().items() if "max_distance" in k)
    b = analysis.beyond(probe, train_length=max_distance, horizon=4 * max_distance)
    assert b.saturation is not None and b.saturation <= max_distance
    assert int(b.distinct[-1]) == int(b.distinct[max_distance])  # no new value past max_distance
    assert int(b.distinct[max_distance // 4]) < int(b.distinct[max_distance])  # still growing before
    assert b.max_unseen == pytest.approx(0.0, abs=1e-5)


# -- order blindness --------------------------------------------------------------------------
def test_order_blindness():
    assert analysis.order_blindness(analysis.build("none", dim=32, num_heads=2)).blind
    assert not analysis.order_blindness(analysis.build("none", dim=32, num_heads=2, causal=True)).blind
    assert not analysis.order_blindness(analysis.build("sinusoidal", dim=32, num_heads=2)).blind
    assert not analysis.order_blindness(toy_probe(ToyRope(16))).blind


# -- every registered encoding gets a card ----------------------------------------------------
@pytest.mark.parametrize("name", posenc.available())
def test_report_card_for_every_registered_encoding(name):
    cfg = analysis.CardConfig(horizon=64, train_length=32, beyond_horizon=96, relative_length=16)
    card = analysis.report_card(name, cfg)
    row = card.row()
    assert row["encoding"] == name and row["family"] == posenc.get(name).family
    assert all(analysis.format_value(v) for v in row.values())


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="unknown encoding"):
        analysis.build("nope")
    with pytest.raises(ValueError, match="num_heads"):
        analysis.build("sinusoidal", dim=30, num_heads=4)
    probe = analysis.build("sinusoidal", dim=16, num_heads=2)
    with pytest.raises(ValueError, match="horizon"):
        analysis.magnitude(probe, horizon=0)
    with pytest.raises(TypeError, match="horizon"):
        analysis.uniqueness(probe, horizon=2.5)
    with pytest.raises(ValueError, match="lengths"):
        analysis.length_dependence(probe, lengths=(16,))
    with pytest.raises(ValueError, match="horizon must be > train_length"):
        analysis.beyond(probe, train_length=64, horizon=64)
    with pytest.raises(ValueError, match="q_content"):
        analysis.scores(probe, torch.zeros(1, 8), torch.zeros(1, 8), 4, 4)
    with pytest.raises(ValueError, match="beyond_horizon"):
        analysis.CardConfig(train_length=64, beyond_horizon=32)


def test_dynamic_ntk_rope_changes_with_length_only_past_its_threshold():
    """Dynamic NTK raises the base once the sequence is longer than max_len: the rotated
    vectors of early positions change with the length, but only past max_len = 32."""
    params = {"rope_type": "dynamic", "factor": 2.0, "max_len": 32}
    probe = analysis.build("rope", dim=32, num_heads=2, params=params)
    assert analysis.length_dependence(probe, lengths=(8, 16, 32)).max_change == 0.0
    assert analysis.length_dependence(probe, lengths=(8, 128)).vector_change > 1e-3
    assert analysis.length_dependence(analysis.build("rope", dim=32, num_heads=2), lengths=(8, 128)).max_change == 0.0
