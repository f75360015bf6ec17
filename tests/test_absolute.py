"""Expected vectors of the absolute family, derived by hand from each formula."""

import dataclasses
import math

import pytest
import torch

import posenc
from posenc.functional import sine_periods


def pos(*values):
    return torch.tensor(values, dtype=torch.long)


def test_integer_adds_the_index_to_every_dimension():
    pe = posenc.create("integer", dim=3)
    expected = torch.tensor([[0.0, 0, 0], [1, 1, 1], [7, 7, 7]])
    torch.testing.assert_close(pe.table(pos(0, 1, 7)), expected)


def test_normalized_divides_by_length_minus_one():
    pe = posenc.create("normalized", dim=2)
    expected = torch.tensor([[0.0, 0.0], [0.25, 0.25], [0.5, 0.5], [0.75, 0.75], [1.0, 1.0]])
    torch.testing.assert_close(pe.table(torch.arange(5)), expected)
    # The flaw: position 3 is 0.75 at L=5 and 0.3 at L=11.
    assert pe.table(torch.arange(11))[3, 0].item() == pytest.approx(0.3)


def test_normalized_length_one_does_not_divide_by_zero():
    pe = posenc.create("normalized", dim=4)
    table = pe.table(pos(0))
    assert torch.isfinite(table).all() and table.abs().max() == 0


def test_normalized_fixed_length_divides_every_position_by_n_minus_one():
    """The causal definition: pos / (N - 1) at every position, past N - 1 included
    (values above 1: the encoding's flaw past the training length), independent of how
    many positions are asked for."""
    pe = posenc.create("normalized", dim=1, length=3)
    torch.testing.assert_close(pe.table(pos(0, 1, 2)), torch.tensor([[0.0], [0.5], [1.0]]))
    torch.testing.assert_close(pe.table(pos(0, 3, 7)), torch.tensor([[0.0], [1.5], [3.5]]))
    long = pe.table(torch.arange(50))[:, 0]
    torch.testing.assert_close(long[:3], pe.table(torch.arange(3))[:, 0])  # a prefix keeps its values
    assert not pe.length_dependent and posenc.create("normalized", dim=1).length_dependent
    assert pe.frequency_state(50) is None
    with pytest.raises(ValueError, match=r"length must be >= 2 \(PE = pos / \(length - 1\)\), got 1"):
        posenc.create("normalized", dim=1, length=1)


def test_normalized_without_length_divides_each_row_by_its_own_last_index():
    free = posenc.create("normalized", dim=1)
    rows = free.table(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]]))  # each row by its own max
    torch.testing.assert_close(rows[:, :, 0], torch.tensor([[0, 1 / 3, 2 / 3, 1.0], [0, 1.0, 0, 0]]))
    assert free.frequency_state(5) == 5 and free.frequency_state(6) == 6


def test_normalized_without_length_is_refused_in_a_causal_model():
    cfg = posenc.TransformerConfig(vocab_size=8, dim=8, num_heads=2, encoding="normalized")
    with pytest.raises(ValueError, match=r"length=None.*causal model.*encoding_params=\{'length': N\}"):
        posenc.Transformer(cfg)
    fixed = posenc.Transformer(dataclasses.replace(cfg, encoding_params={"length": 6}))
    assert fixed.pe.params.causal and fixed.pe.params.length == 6 and not fixed.pe.length_dependent
    encoder = posenc.Transformer(dataclasses.replace(cfg, causal=False))  # bidirectional: the classic definition
    assert encoder.pe.params.length is None and encoder.pe.length_dependent
    with pytest.raises(TypeError, match="causal must be a bool"):
        posenc.create("normalized", dim=8, causal=1)


def test_binary_bits_least_significant_first():
    pe = posenc.create("binary", dim=4)
    expected = torch.tensor([[0.0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pe.table(pos(0, 5, 6, 15)), expected)


def test_binary_too_many_bits_is_a_clear_error():
    pe = posenc.create("binary", dim=4)
    with pytest.raises(ValueError, match=r"positions < 2\*\*4 = 16; got position 16"):
        pe.table(pos(3, 16))


def test_sine_formula_and_exact_period():
    pe = posenc.create("sine", dim=2, min_period=4, ratio=2)  # periods 4 and 8
    got = pe.table(pos(0, 1, 2, 3))
    expected = torch.tensor(
        [
            [0.0, 0.0],
            [math.sin(2 * math.pi / 4), math.sin(2 * math.pi / 8)],
            [math.sin(2 * math.pi * 2 / 4), math.sin(2 * math.pi * 2 / 8)],
            [math.sin(2 * math.pi * 3 / 4), math.sin(2 * math.pi * 3 / 8)],
        ]
    )
    torch.testing.assert_close(got, expected)
    # The flaw: the whole vector repeats with the longest period (8 here), at any offset.
    torch.testing.assert_close(pe.table(torch.arange(10**6, 10**6 + 8)), pe.table(torch.arange(10**6 + 8, 10**6 + 16)))
    assert sine_periods(3, 5, 3).tolist() == [5.0, 15.0, 45.0]


def test_sinusoidal_formula_at_small_size():
    pe = posenc.create("sinusoidal", dim=4, base=100.0)
    # inv_freq = 100**(-0/4), 100**(-2/4) = 1, 0.1
    p = 3.0
    expected = torch.tensor([[math.sin(p), math.cos(p), math.sin(p * 0.1), math.cos(p * 0.1)]])
    torch.testing.assert_close(pe.table(pos(3)), expected)


def test_sinusoidal_equals_distilbert_reference():
    from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

    out = torch.empty(64, 16)
    _create_sinusoidal_embeddings(n_pos=64, dim=16, out=out)
    torch.testing.assert_close(posenc.create("sinusoidal", dim=16).table(torch.arange(64)), out)


def test_sinusoidal_exact_at_long_positions():
    # Angles are formed in float64: position 10**6 matches a float64 reference to float32 precision.
    p = 10**6
    got = posenc.create("sinusoidal", dim=8).table(pos(p))[0].double()
    inv = [10000.0 ** (-2 * i / 8) for i in range(4)]
    ref = torch.tensor([f(p * w) for w in inv for f in (math.sin, math.cos)], dtype=torch.float64)
    assert (got - ref).abs().max() < 1e-7


def test_learned_table_is_its_weight_and_errors_past_max_len():
    pe = posenc.create("learned", dim=3, max_len=5)
    torch.testing.assert_close(pe.table(pos(4, 0)), pe.weight[[4, 0]])
    with pytest.raises(ValueError, match="max_len=5"):
        pe.table(pos(5))


def test_learned_gradcheck_float64():
    pe = posenc.create("learned", dim=3, max_len=6).double()
    p = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5]])

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pe = pe

        def forward(self, x):
            return self.pe.embed(x, p)

    wrap = Wrap()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = pe.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(wrap, {"pe.weight": w}, (x,)), (x, w))
    wrap(x).pow(2).sum().backward()
    assert (pe.weight.grad.abs().sum(-1) > 0).all()  # every row 0..5 is used above


@pytest.mark.parametrize("name", ["integer", "normalized", "binary", "sine", "sinusoidal", "learned"])
def test_embed_adds_the_table(name):
    pe = posenc.create(name, dim=8)
    x = torch.randn(2, 5, 8)
    p = torch.arange(5)
    torch.testing.assert_close(pe.embed(x, p), x + pe.table(p))
    # [b, s] positions: each row gets its own vectors.
    pb = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    out = pe.embed(x, pb)
    torch.testing.assert_close(out[1], x[1] + pe.table(pb[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_embed_keeps_activation_dtype(dtype):
    pe = posenc.create("sinusoidal", dim=8)
    x = torch.randn(1, 3, 8, dtype=dtype)
    assert pe.embed(x, torch.arange(3)).dtype == dtype


def test_nope_hooks_are_identities():
    pe = posenc.create("none")
    x, q, k = torch.randn(1, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    p = torch.arange(3)
    assert pe.embed(x, p) is x
    assert pe.rotate(q, k, p, p) == (q, k)
    assert pe.bias(p, p) is None
