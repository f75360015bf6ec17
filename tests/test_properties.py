"""Properties of the absolute family, driven by hypothesis."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import posenc

positions = st.lists(st.integers(0, 2**20), min_size=1, max_size=16)


@settings(max_examples=50, deadline=None)
@given(positions, st.integers(1, 8))
def test_integer_magnitude_is_linear_in_position(ps, dim):
    table = posenc.create("integer", dim=dim).table(torch.tensor(ps))
    expected = torch.tensor(ps, dtype=torch.float32) * dim**0.5
    torch.testing.assert_close(table.norm(dim=-1), expected)


@settings(max_examples=50, deadline=None)
@given(positions)
def test_binary_bits_reconstruct_the_index(ps):
    table = posenc.create("binary", dim=21).table(torch.tensor(ps))
    recon = (table.double() * 2 ** torch.arange(21, dtype=torch.float64)).sum(-1)
    assert recon.tolist() == [float(p) for p in ps]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200))
def test_normalized_is_in_unit_interval_with_endpoints(length):
    col = posenc.create("normalized", dim=1).table(torch.arange(length))[:, 0]
    assert col.min() == 0 and col.max() == (1.0 if length > 1 else 0.0)
    assert bool((col.diff() > 0).all())


@settings(max_examples=50, deadline=None)
@given(positions, st.integers(2, 4096))
def test_normalized_with_fixed_length_is_pos_over_n_minus_one_whatever_follows(ps, length):
    """Causal definition: each position's value is pos / (N - 1), whatever other positions
    are in the call (a prefix keeps its values); above 1 exactly past N - 1."""
    pe = posenc.create("normalized", dim=2, length=length)
    table = pe.table(torch.tensor(ps)).double()
    expected = torch.tensor(ps, dtype=torch.float64) / (length - 1)
    torch.testing.assert_close(table[:, 0], expected.float().double())
    torch.testing.assert_close(table[:, 1], table[:, 0])
    torch.testing.assert_close(pe.table(torch.tensor(ps[:1])), pe.table(torch.tensor(ps))[:1])
    assert ((table[:, 0] > 1) == (torch.tensor(ps) > length - 1)).all()


@settings(max_examples=30, deadline=None)
@given(positions, st.sampled_from([2, 8, 32]))
def test_sinusoidal_pairs_lie_on_the_unit_circle(ps, dim):
    table = posenc.create("sinusoidal", dim=dim).table(torch.tensor(ps)).double()
    radius = table[..., 0::2] ** 2 + table[..., 1::2] ** 2
    torch.testing.assert_close(radius, torch.ones_like(radius), atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**20), st.integers(1, 64))
def test_sinusoidal_shift_is_a_rotation(p, k):
    """PE(p + k) is a fixed rotation of PE(p) in each (sin, cos) pair (Vaswani et al. 3.5)."""
    dim = 8
    pe = posenc.create("sinusoidal", dim=dim)
    a, b = pe.table(torch.tensor([p])).double()[0], pe.table(torch.tensor([p + k])).double()[0]
    w = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    c, s = torch.cos(k * w), torch.sin(k * w)
    rotated_sin = a[0::2] * c + a[1::2] * s
    rotated_cos = a[1::2] * c - a[0::2] * s
    torch.testing.assert_close(torch.stack([rotated_sin, rotated_cos], -1).flatten(), b, atol=1e-6, rtol=0)
