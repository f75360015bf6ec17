"""Attention and the reference Transformer: hooks, masks, cache, and order blindness."""

import math

import pytest
import torch

import posenc
from posenc.registry import parameter_names


def reference_attention(q, k, v, bias=None, causal=False):
    """Plain softmax attention for comparison: q [b,h,s_q,d], k/v [b,h_kv,s_k,d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if causal:
        s_q, s_k = scores.shape[-2:]
        mask = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class ConstantBias(posenc.PositionalEncoding):
    """A test-only encoding with a fixed random bias, to check how attention adds it."""

    name = "test-constant-bias"

    def __init__(self, table):
        super().__init__()
        self.table_ = table

    def bias(self, q_positions, k_positions, *, q=None, k=None):
        return self.table_[:, q_positions][:, :, k_positions]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_reference_softmax(causal, kv_heads):
    attn = posenc.Attention(16, 4, num_kv_heads=kv_heads, causal=causal)
    x = torch.randn(2, 6, 16)
    q = attn.q_proj(x).view(2, 6, 4, 4).transpose(1, 2)  # [b, h, s, d]
    k = attn.k_proj(x).view(2, 6, kv_heads, 4).transpose(1, 2)
    v = attn.v_proj(x).view(2, 6, kv_heads, 4).transpose(1, 2)
    ref = attn.out_proj(reference_attention(q, k, v, causal=causal).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_bias_is_added_before_softmax_and_mask():
    table = torch.randn(4, 10, 10)
    attn = posenc.Attention(16, 4, pe=ConstantBias(table), causal=True)
    x = torch.randn(1, 6, 16)
    q = attn.q_proj(x).view(1, 6, 4, 4).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, 4, 4).transpose(1, 2)
    v = attn.v_proj(x).view(1, 6, 4, 4).transpose(1, 2)
    ref = reference_attention(q, k, v, bias=table[:, :6, :6], causal=True)
    ref = attn.out_proj(ref.transpose(1, 2).reshape(1, 6, 16))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_no_positions_no_mask_is_permutation_equivariant():
    """'I go home' and 'home go I' give the same set of outputs without positions."""
    attn = posenc.Attention(16, 4, causal=False)
    x = torch.randn(1, 5, 16)
    perm = torch.tensor([2, 1, 0, 4, 3])
    torch.testing.assert_close(attn(x)[:, perm], attn(x[:, perm]), atol=1e-5, rtol=1e-5)


def test_causal_mask_breaks_permutation_equivariance():
    attn = posenc.Attention(16, 4, causal=True)
    x = torch.randn(1, 5, 16)
    perm = torch.tensor([2, 1, 0, 4, 3])
    assert not torch.allclose(attn(x)[:, perm], attn(x[:, perm]), atol=1e-4)


@pytest.mark.parametrize("name", ["none", "sinusoidal", "learned", "integer"])
def test_encoder_model_order_blindness(name):
    """A bidirectional encoder: 'I go home' vs 'home go I'. Only NoPE is blind to order."""
    cfg = posenc.TransformerConfig(vocab_size=20, dim=16, num_heads=2, causal=False, encoding=name, max_len=8)
    model = posenc.Transformer(cfg).eval()
    tokens = torch.tensor([[3, 7, 11]])  # I go home
    perm = torch.tensor([2, 1, 0])  # home go I
    same = torch.allclose(model(tokens)[:, perm], model(tokens[:, perm]), atol=1e-5)
    assert same == (name == "none")


def encoding_params_for_decoding(name, seq):
    """Extra parameters so a length-dependent encoding is well defined while decoding."""
    cls = posenc.get(name)
    extra = {"length": seq} if cls.length_dependent and "length" in parameter_names(name) else {}
    return {**cls.example_params, **extra}


@pytest.mark.parametrize("name", posenc.available())
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_decode_equals_full_forward(name, kv_heads):
    """Prefill 3 tokens, then decode one at a time: every step equals the full forward."""
    seq = 9
    cfg = posenc.TransformerConfig(
        vocab_size=32,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        encoding=name,
        encoding_params=encoding_params_for_decoding(name, seq),
        max_len=16,
    )
    model = posenc.Transformer(cfg).eval()
    tokens = torch.randint(0, 32, (2, seq))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :3], cache=cache)]
        for t in range(3, seq):
            steps.append(model(tokens[:, t : t + 1], cache=cache))
    assert cache.length == seq
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)


def test_normalized_without_fixed_length_is_length_dependent():
    """The flaw, visible in decoding: earlier tokens were encoded for a shorter length.
    A plain cache keeps them stale; the exact cache recomputes the prefix every step."""
    # A causal config refuses normalized without a length; an explicit instance (the
    # classic definition, built non-causal) shows what the refusal prevents.
    cfg = posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, encoding="none")
    model = posenc.Transformer(cfg, pe=posenc.create("normalized", dim=16)).eval()
    with torch.no_grad():  # larger value weights: the stale prefix shows in the logits
        for block in model.blocks:
            block.attn.v_proj.weight.mul_(30)
    tokens = torch.randint(0, 16, (1, 6))
    with torch.no_grad():
        last = torch.cat([model(tokens[:, : t + 1])[:, -1:] for t in range(6)], 1)
        stale = model.new_cache(exact=False)
        steps = torch.cat([model(tokens[:, t : t + 1], cache=stale) for t in range(6)], 1)
        exact = model.new_cache()
        exact_steps = torch.cat([model(tokens[:, t : t + 1], cache=exact) for t in range(6)], 1)
    assert not torch.allclose(steps, last, atol=1e-4)
    torch.testing.assert_close(exact_steps, last, atol=2e-5, rtol=1e-4)
    assert exact.recomputations == 5  # every step after the first changes the length


def test_explicit_offset_positions_change_output_only_with_an_encoding():
    tokens = torch.randint(0, 16, (1, 5))
    for name, changes in [("sinusoidal", True), ("none", False)]:
        model = posenc.Transformer(posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, encoding=name)).eval()
        a = model(tokens)
        b = model(tokens, torch.arange(10, 15))
        assert (not torch.allclose(a, b, atol=1e-5)) == changes, name


def test_left_padding_equals_unpadded_sequence():
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, encoding="sinusoidal"))
    model.eval()
    real = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    out = model(padded, positions, padding_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2:], model(real)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(padded[1:])[0], atol=1e-5, rtol=1e-5)


def test_left_padding_with_cache_decoding():
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, encoding="sinusoidal"))
    model.eval()
    padded = torch.tensor([[0, 0, 5, 6]])
    mask = torch.tensor([[False, False, True, True]])
    cache = model.new_cache()
    model(padded, torch.tensor([[0, 0, 0, 1]]), cache=cache, padding_mask=mask)
    step = model(torch.tensor([[9]]), torch.tensor([[2]]), cache=cache)
    ref = model(torch.tensor([[5, 6, 9]]))[:, -1:]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def test_packed_sequences_equal_separate_forwards():
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, encoding="sinusoidal"))
    model.eval()
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])
    packed = torch.cat([a, b], 1)
    out = model(packed, torch.tensor([0, 1, 2, 0, 1]), segment_ids=torch.tensor([[0, 0, 0, 1, 1]]))
    torch.testing.assert_close(out[:, :3], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], model(b), atol=1e-5, rtol=1e-5)


def test_one_encoding_instance_is_shared_by_every_layer():
    cfg = posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, num_layers=3, encoding="sinusoidal")
    model = posenc.Transformer(cfg)
    assert all(block.attn.pe is model.pe for block in model.blocks)
    pe = posenc.create("learned", dim=16, max_len=8)
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=16, dim=16, num_heads=2, encoding="learned"), pe=pe)
    assert model.pe is pe
    assert sum(p is pe.weight for p in model.parameters()) == 1


# -- bad input ----------------------------------------------------------------------------


def test_attention_bad_construction():
    with pytest.raises(ValueError, match="num_heads must be > 0"):
        posenc.Attention(16, 0)
    with pytest.raises(ValueError, match="dim=10 is not divisible by num_heads=4"):
        posenc.Attention(10, 4)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        posenc.Attention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        posenc.Attention(16, 4, backend="cuda-magic")
    with pytest.raises(TypeError, match="pe must be a posenc.PositionalEncoding"):
        posenc.Attention(16, 4, pe="rope")


def test_attention_bad_inputs():
    attn = posenc.Attention(16, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[b, s, d\]"):
        attn(torch.randn(5, 16))
    with pytest.raises(ValueError, match="x has last dimension 8"):
        attn(torch.randn(1, 5, 8))
    with pytest.raises(TypeError, match="x must be floating point"):
        attn(torch.ones(1, 5, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must have an integer dtype"):
        attn(torch.randn(1, 5, 16), torch.arange(5.0))
    with pytest.raises(ValueError, match="positions must be non-negative"):
        attn(torch.randn(1, 5, 16), torch.arange(-1, 4))
    with pytest.raises(ValueError, match=r"positions must have shape \[s\] or \[b, s\]"):
        attn(torch.randn(1, 5, 16), torch.zeros(1, 1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="positions has length 4 but the input has 5 tokens"):
        attn(torch.randn(1, 5, 16), torch.arange(4))
    with pytest.raises(ValueError, match="positions has batch size 3"):
        attn(torch.randn(2, 5, 16), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        attn(torch.randn(1, 5, 16), padding_mask=torch.ones(1, 5))


def test_encoding_dim_mismatch_and_bias_head_mismatch():
    with pytest.raises(ValueError, match="built with dim=8"):
        posenc.create("sinusoidal", dim=8).embed(torch.randn(1, 3, 16), torch.arange(3))
    attn = posenc.Attention(16, 4, pe=ConstantBias(torch.randn(2, 8, 8)))
    with pytest.raises(ValueError, match=r"bias has shape \(2, 3, 3\); attention expects \[4, 3, 3\]"):
        attn(torch.randn(1, 3, 16))


def test_model_bad_inputs():
    with pytest.raises(ValueError, match="unknown encoding 'ropee'"):
        posenc.TransformerConfig(vocab_size=10, encoding="ropee")
    with pytest.raises(ValueError, match="vocab_size must be > 0"):
        posenc.TransformerConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dim=30 is not divisible by num_heads=4"):
        posenc.TransformerConfig(vocab_size=10, dim=30)
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=10, dim=16, num_heads=2, encoding="none"))
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 10\)"):
        model(torch.tensor([[1, 10]]))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match="learned encoding has max_len=4"):
        posenc.Transformer(posenc.TransformerConfig(vocab_size=10, dim=16, num_heads=2, encoding="learned", max_len=4))(
            torch.zeros(1, 5, dtype=torch.long)
        )
