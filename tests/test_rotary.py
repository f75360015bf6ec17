"""The rotary family: hand-derived rotations, layouts against transformers, relative
property, norms, exact angles at long positions, dtype-safe caches, KV-cache decoding
for every rope_type, xPos, p-RoPE, rope2d, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import posenc
from posenc.encodings.rotary import TABLE_CAP
from posenc.functional import apply_rotary, rope

C, S = math.cos, math.sin


def rot(pe, x, positions):
    """Rotate one vector set ``x [s, d]`` as queries."""
    q = x[None, None]  # [1, 1, s, d]
    out, _ = pe.rotate(q, q, positions, positions)
    return out[0, 0]


# -- hand-derived rotations (head_dim 4, base 100: inv_freq [1, 0.1]) ------------------------
def test_half_layout_hand():
    pe = posenc.create("rope", head_dim=4, base=100.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    # pairs (x0, x2) at angle 1 and (x1, x3) at angle 0.1, position 1
    expected = [1 * C(1) - 3 * S(1), 2 * C(0.1) - 4 * S(0.1), 3 * C(1) + 1 * S(1), 4 * C(0.1) + 2 * S(0.1)]
    torch.testing.assert_close(rot(pe, x, torch.tensor([1])), torch.tensor([expected], dtype=torch.float64))


def test_interleaved_layout_hand():
    pe = posenc.create("rope", head_dim=4, base=100.0, layout="interleaved")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    # pairs (x0, x1) at angle 2 * 1 and (x2, x3) at angle 2 * 0.1, position 2
    expected = [1 * C(2) - 2 * S(2), 2 * C(2) + 1 * S(2), 3 * C(0.2) - 4 * S(0.2), 4 * C(0.2) + 3 * S(0.2)]
    torch.testing.assert_close(rot(pe, x, torch.tensor([2])), torch.tensor([expected], dtype=torch.float64))


def test_partial_rotary_hand():
    # head_dim 6, rotary_dim 2, base 100: only (x0, x1) rotates, at angle 3 * 1
    pe = posenc.create("rope", head_dim=6, base=100.0, rotary_dim=2)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    expected = [C(3) - 2 * S(3), 2 * C(3) + S(3), 3, 4, 5, 6]
    torch.testing.assert_close(rot(pe, x, torch.tensor([3])), torch.tensor([expected], dtype=torch.float64))
    same = posenc.create("rope", head_dim=6, base=100.0, partial_rotary_factor=1 / 3)
    torch.testing.assert_close(rot(same, x, torch.tensor([3])), torch.tensor([expected], dtype=torch.float64))


def test_attention_factor_scales_cos_sin():
    pe = posenc.create("rope", head_dim=4, base=100.0, rope_type="yarn", factor=4.0, original_max_len=8)
    af = 0.1 * math.log(4) + 1
    cos, sin = pe.cos_sin(torch.tensor([0, 3]), dtype=torch.float64)
    torch.testing.assert_close(cos[0], torch.full((2,), af, dtype=torch.float64))
    torch.testing.assert_close(sin[0], torch.zeros(2, dtype=torch.float64))
    inv = pe.inv_freq
    torch.testing.assert_close(cos[1], af * torch.cos(3 * inv))


# -- against transformers' rotations -----------------------------------------------------
def test_half_equals_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    pe = posenc.create("rope", head_dim=16, base=500.0)
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    pos = torch.arange(5, 12).expand(2, 7)
    cos, sin = rope.expand_cos_sin(*pe.cos_sin(pos))  # [b, s, d]
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    out_q, out_k = pe.rotate(q, k, pos, pos)
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)
    x1, x2 = q.chunk(2, dim=-1)
    rotate_half = torch.cat([-x2, x1], dim=-1)  # Hugging Face's rotate_half
    torch.testing.assert_close(q * cos[:, None] + rotate_half * sin[:, None], ref_q)


def test_interleaved_equals_gptj():
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    pe = posenc.create("rope", head_dim=16, layout="interleaved", rotary_dim=8)
    q = torch.randn(2, 3, 7, 16)
    pos = torch.arange(7)
    cos, sin = pe.cos_sin(pos)  # [s, 4]
    x = q.transpose(1, 2)  # [b, s, h, d] as GPT-J
    rot_part = apply_rotary_pos_emb(x[..., :8], sin[None].expand(2, -1, -1), cos[None].expand(2, -1, -1))
    ref = torch.cat([rot_part, x[..., 8:]], dim=-1).transpose(1, 2)
    torch.testing.assert_close(pe.rotate(q, q, pos, pos)[0], ref)


# -- relative property and norms -----------------------------------------------------------
CONFIGS = [
    dict(head_dim=16),
    dict(head_dim=16, layout="interleaved"),
    dict(head_dim=24, rotary_dim=8),
    dict(head_dim=24, partial_rotary_factor=0.5, layout="interleaved"),
    dict(head_dim=16, base=5e5, rope_type="linear", factor=4.0),
    dict(head_dim=16, rope_type="yarn", factor=4.0, original_max_len=64),
    dict(
        head_dim=16,
        rope_type="llama3",
        factor=8.0,
        original_max_len=64,
        rope_parameters={"low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),
    dict(head_dim=16, rope_type="proportional", partial_rotary_factor=0.5),
]


def _scores(pe, q, k, m, n):
    qr, _ = pe.rotate(q[None, None], q[None, None], torch.tensor([m]), torch.tensor([m]))
    _, kr = pe.rotate(k[None, None], k[None, None], torch.tensor([n]), torch.tensor([n]))
    return (qr * kr).sum()


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: str(p)[:60])
def test_scores_depend_only_on_offset(params):
    pe = posenc.create("rope", **params)
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, params["head_dim"], generator=g, dtype=torch.float64),
        torch.randn(1, params["head_dim"], generator=g, dtype=torch.float64),
    )
    for m, n in [(5, 2), (1003, 1000), (70003, 70000)]:
        torch.testing.assert_close(_scores(pe, q, k, m, n), _scores(pe, q, k, 3, 0), rtol=1e-9, atol=1e-9)
    # and it does depend on the offset
    assert abs(float(_scores(pe, q, k, 9, 0) - _scores(pe, q, k, 3, 0))) > 1e-3


@pytest.mark.parametrize("name", ["dynamic", "longrope", "interleaved-partial-dynamic"])
def test_length_dependent_scores_relative_within_a_call(name):
    # one call = one length L: the same q and k vector at every position give a Toeplitz score matrix
    pe = posenc.create("rope", head_dim=8, **DECODE[name])
    n = 3 * ORIG
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, n, 8)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, n, 8)
    qr, kr = pe.rotate(q, k, torch.arange(n), torch.arange(n))
    scores = (qr @ kr.transpose(-1, -2))[0, 0]  # [n, n]
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1])


@pytest.mark.parametrize("params", [c for c in CONFIGS if c.get("rope_type") != "yarn"], ids=lambda p: str(p)[:60])
def test_norms_preserved(params):
    pe = posenc.create("rope", **params)  # (yarn scales cos/sin by its attention factor: next test)
    assert pe.attention_factor == 1.0
    x = torch.randn(2, 2, 9, params["head_dim"], dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 100, 4095, 4096, 65535, 65536, 1 << 20])
    out, _ = pe.rotate(x, x, pos, pos)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_yarn_norms_scale_by_attention_factor():
    pe = posenc.create("rope", head_dim=16, rope_type="yarn", factor=4.0, original_max_len=64)
    x = torch.randn(1, 1, 5, 16, dtype=torch.float64)
    out, _ = pe.rotate(x, x, torch.arange(5), torch.arange(5))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1) * (0.1 * math.log(4) + 1))


def test_batched_positions_equal_per_row():
    pe = posenc.create("rope", head_dim=8)
    q = torch.randn(2, 2, 4, 8)
    pos = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    out, _ = pe.rotate(q, q, pos, pos)
    for b in range(2):
        ref, _ = pe.rotate(q[b : b + 1], q[b : b + 1], pos[b], pos[b])
        torch.testing.assert_close(out[b : b + 1], ref)


# -- exact angles ---------------------------------------------------------------------------
def _positions():
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.arange(0, 64), torch.randint(0, 1 << 20, (2000,), generator=g), torch.tensor([1 << 20])])


@pytest.mark.parametrize("base", [1e4, 5e5])
def test_cos_sin_exact_to_2e7_up_to_2_pow_20(base):
    pe = posenc.create("rope", head_dim=128, base=base)
    pos = _positions()
    ref_angle = pos.double()[:, None] * pe.inv_freq  # float64 reference
    for table in (True, False):  # positions below TABLE_CAP use the table, larger ones direct
        p = pos[pos < TABLE_CAP] if table else pos
        cos, sin = pe.cos_sin(p)
        assert cos.dtype == torch.float32
        a = p.double()[:, None] * pe.inv_freq
        assert (cos.double() - torch.cos(a)).abs().max() <= 2e-7
        assert (sin.double() - torch.sin(a)).abs().max() <= 2e-7
    # what the usual float32 `position * inv_freq` gives, for contrast
    usual = torch.cos(pos.float()[:, None] * pe.inv_freq.float())
    assert (usual.double() - torch.cos(ref_angle)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rotation_exact_in_every_dtype(dtype):
    pe = posenc.create("rope", head_dim=128, base=5e5)
    pos = _positions()[:300]
    x = torch.randn(1, 1, pos.numel(), 128, dtype=torch.float64)
    ref, _ = pe.rotate(x, x, pos, pos)  # float64 all through
    cos = torch.cos(pos.double()[:, None] * pe.inv_freq)
    out, _ = pe.rotate(x.to(dtype), x.to(dtype), pos, pos)
    assert out.dtype == dtype
    # float64 activations get float64 cos/sin; others the exact float32 cache, cast once
    cos_used = pe.cos_sin(pos, dtype=torch.float64 if dtype == torch.float64 else torch.float32)[0]
    assert (cos_used.double() - cos).abs().max() <= (1e-12 if dtype == torch.float64 else 2e-7)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=8 * eps * float(x.abs().max()))


def test_model_to_bfloat16_keeps_exact_buffers():
    model = posenc.Transformer(posenc.TransformerConfig(vocab_size=20, dim=32, num_heads=2, encoding="rope"))
    pe = model.pe
    pe.cos_sin(torch.arange(300))  # build a table
    before = pe.main_cos.clone()
    model.to(torch.bfloat16)
    assert pe.inv_freq.dtype == torch.float64 and pe.main_cos.dtype == torch.float32
    assert torch.equal(pe.main_cos, before)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    model.half()
    model.double()
    assert pe.inv_freq.dtype == torch.float64 and pe.main_cos.dtype == torch.float32
    assert "inv_freq" not in model.state_dict() and not any("main_cos" in k for k in model.state_dict())
    logits = model.to(torch.bfloat16)(torch.randint(0, 20, (1, 5)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_meta_device_round_trip_rebuilds():
    pe = posenc.create("rope", head_dim=8)
    ref = pe.cos_sin(torch.arange(10))[0]
    pe.to("meta")
    assert pe.inv_freq.is_meta
    pe.to_empty(device="cpu")
    torch.testing.assert_close(pe.cos_sin(torch.arange(10))[0], ref)


# -- KV-cache decoding equals full forward, every rope_type --------------------------------
ORIG = 6
DECODE = {
    "default": dict(),
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0, max_len=ORIG),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_len=ORIG),
    "longrope": dict(
        rope_type="longrope",
        original_max_len=ORIG,
        factor=4.0,
        rope_parameters={"short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]},
    ),
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        original_max_len=ORIG,
        rope_parameters={"low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),
    "proportional": dict(rope_type="proportional", partial_rotary_factor=0.5),
    "interleaved-partial-dynamic": dict(
        layout="interleaved", rotary_dim=4, rope_type="dynamic", factor=3.0, max_len=ORIG
    ),
}


def _sharpen(model):
    """Large q/k weights, so attention (and so the logits) depends strongly on position."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(25)
            block.attn.k_proj.weight.mul_(25)
    return model


def _decode_matches_full(model, tokens, exact=True):
    with torch.no_grad():
        cache = model.new_cache(exact=exact)
        for n in range(1, tokens.shape[1] + 1):
            step = model(tokens[:, n - 1 : n], cache=cache)[:, -1]  # [b, vocab]
            full = model(tokens[:, :n])[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def _decode_cases():
    for name in DECODE:
        yield name, 1
        yield name, 2  # length-dependent rules: the exact cache recomputes the prefix


@pytest.mark.parametrize("name,num_layers", list(_decode_cases()))
def test_kv_cache_decode_equals_full_forward(name, num_layers):
    """Keys are cached before rotation and re-rotated with the frequencies of the current
    length, so one attention layer decodes exactly as a full forward for every rule.

    With two layers a length-dependent rule (dynamic, longrope) cannot match: in a full
    forward of length n every token's layer-1 output uses the frequencies of length n,
    while the cached layer-2 keys/values of earlier tokens were computed at their own,
    shorter, lengths (see the next test and docs/rotary.md)."""
    pe_params = DECODE[name]
    torch.manual_seed(0)
    cfg = posenc.TransformerConfig(
        vocab_size=31, dim=32, num_heads=4, num_kv_heads=2, num_layers=num_layers, encoding_params=pe_params
    )
    model = _sharpen(posenc.Transformer(cfg).eval())
    _decode_matches_full(model, torch.randint(0, 31, (2, 3 * ORIG)))


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_length_dependent_multi_layer_decode_differs_past_threshold(name):
    torch.manual_seed(0)
    cfg = posenc.TransformerConfig(vocab_size=31, dim=32, num_heads=4, num_layers=2, encoding_params=DECODE[name])
    model = _sharpen(posenc.Transformer(cfg).eval())
    tokens = torch.randint(0, 31, (1, 3 * ORIG))
    # Without recomputation (Hugging Face's behaviour), equal only while the frequencies
    # do not change: earlier tokens' deeper-layer keys were computed at shorter lengths.
    _decode_matches_full(model, tokens[:, :ORIG], exact=False)
    with pytest.raises(AssertionError):
        _decode_matches_full(model, tokens, exact=False)
    _decode_matches_full(model, tokens, exact=True)  # the exact cache recomputes the prefix


def test_rotated_key_cache_would_drift():
    """What caching keys *after* rotation (transformers' cache) does with dynamic NTK:
    a key rotated at its own step's length differs from the same key rotated at the
    current length, so its score with the current query is wrong."""
    pe = posenc.create("rope", head_dim=8, **DECODE["dynamic"])
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    short, long = k.expand(1, 1, 3, 8), k.expand(1, 1, 3 * ORIG, 8)
    _, k_then = pe.rotate(short[..., :1, :], short, torch.tensor([2]), torch.arange(3))  # step 3
    _, k_now = pe.rotate(long[..., :1, :], long, torch.tensor([3 * ORIG - 1]), torch.arange(3 * ORIG))
    assert (k_then[..., 2, :] - k_now[..., 2, :]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["xpos", "rope2d"])
def test_kv_cache_decode_other_rotary(name):
    torch.manual_seed(0)
    params = {"grid_width": 4} if name == "rope2d" else {"scale_base": 8.0}
    model = posenc.Transformer(
        posenc.TransformerConfig(vocab_size=31, dim=32, num_heads=4, encoding=name, encoding_params=params)
    ).eval()
    _sharpen(model)
    _decode_matches_full(model, torch.randint(0, 31, (2, 14)))


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_length_dependent_frequencies_change_with_length(name):
    pe = posenc.create("rope", head_dim=8, **DECODE[name])
    assert pe.length_dependent
    pos = torch.arange(ORIG)
    short = pe.cos_sin(pos, length=ORIG)[0]
    long = pe.cos_sin(pos, length=3 * ORIG)[0]
    assert (short - long).abs().max() > 1e-3
    expected_inv, af = posenc.rope_frequencies(
        8, pe.params.hf_parameters(), max_position_embeddings=pe.params.max_len, seq_len=3 * ORIG
    )
    torch.testing.assert_close(long, (af * torch.cos(pos.double()[:, None] * expected_inv)).float())


def test_dynamic_scaling_is_active_in_the_model():
    # same weights: equal to plain RoPE up to the threshold, different past it
    torch.manual_seed(0)
    dyn = posenc.Transformer(
        posenc.TransformerConfig(vocab_size=31, dim=32, num_heads=4, encoding_params=DECODE["dynamic"])
    )
    plain = posenc.Transformer(posenc.TransformerConfig(vocab_size=31, dim=32, num_heads=4))
    _sharpen(dyn)
    plain.load_state_dict(dyn.state_dict())
    tokens = torch.randint(0, 31, (1, 3 * ORIG))
    with torch.no_grad():
        torch.testing.assert_close(dyn(tokens[:, :ORIG]), plain(tokens[:, :ORIG]))
        assert (dyn(tokens) - plain(tokens)).abs().max() > 1e-2


# -- proportional, xpos, rope2d ------------------------------------------------------------------
def test_proportional_equals_rope_type_and_keeps_nope_pairs():
    a = posenc.create("proportional", head_dim=8, partial_rotary_factor=0.5)
    b = posenc.create("rope", head_dim=8, rope_type="proportional", partial_rotary_factor=0.5)
    x = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    pos = torch.arange(100, 106)
    out = a.rotate(x, x, pos, pos)[0]
    torch.testing.assert_close(out, b.rotate(x, x, pos, pos)[0])
    # half layout: pairs (i, i + 4); pairs 2 and 3 (dims 2, 3, 6, 7) have frequency 0
    torch.testing.assert_close(out[..., [2, 3, 6, 7]], x[..., [2, 3, 6, 7]])
    assert (out[..., [0, 1, 4, 5]] - x[..., [0, 1, 4, 5]]).abs().max() > 1e-2


def test_xpos_hand():
    # head_dim 2, base 100 (inv_freq [1]), gamma 0.4: zeta = 0.4 / 1.4; scale_base 4.
    # q at m=3, k at n=1: centre c = (1 + 3) / 2 = 2.
    pe = posenc.create("xpos", head_dim=2, base=100.0, scale_base=4.0)
    zeta = 0.4 / 1.4
    e = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    qm, kn = pe.rotate(e, e, torch.tensor([3]), torch.tensor([1]))
    torch.testing.assert_close(qm[0, 0, 0], zeta ** ((3 - 2) / 4) * torch.tensor([C(3), S(3)], dtype=torch.float64))
    torch.testing.assert_close(kn[0, 0, 0], zeta ** (-(1 - 2) / 4) * torch.tensor([C(1), S(1)], dtype=torch.float64))
    # score = zeta^((3 - 1) / 4) cos(3 - 1)
    torch.testing.assert_close((qm * kn).sum(), torch.tensor(zeta**0.5 * C(2), dtype=torch.float64))


def test_xpos_relative_and_overflow_error():
    pe = posenc.create("xpos", head_dim=8, scale_base=64.0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m, n):
        qr, kr = pe.rotate(q, k, torch.tensor([m]), torch.tensor([n]))
        return (qr * kr).sum()

    torch.testing.assert_close(score(10, 4), score(1006, 1000))
    big = torch.tensor([0, 400000])
    x = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="xpos"):
        pe.rotate(x, x, big, big)


def test_rope2d_hand_and_coords():
    # head_dim 4, base 100: dims (0, 1) rotate by the row, (2, 3) by the column, inv_freq [1]
    pe = posenc.create("rope2d", head_dim=4, base=100.0, grid_width=3)
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    out, _ = pe.rotate(x, x, torch.tensor([7]), torch.tensor([7]))  # patch 7 = (row 2, col 1)
    expected = [C(2) - 2 * S(2), 2 * C(2) + S(2), 3 * C(1) - 4 * S(1), 4 * C(1) + 3 * S(1)]
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(expected, dtype=torch.float64))
    via_coords, _ = pe.rotate_coords(x, x, torch.tensor([[2, 1]]), torch.tensor([[2, 1]]))
    torch.testing.assert_close(via_coords, out)


def test_rope2d_depends_on_row_and_column_offsets():
    pe = posenc.create("rope2d", head_dim=16, grid_width=10)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(a, b):
        qr, kr = pe.rotate_coords(q, k, torch.tensor([a]), torch.tensor([b]))
        return (qr * kr).sum()

    torch.testing.assert_close(score((5, 7), (2, 3)), score((103, 54), (100, 50)))
    assert abs(float(score((5, 7), (2, 3)) - score((5, 7), (3, 2)))) > 1e-3


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,exc,word",
    [
        (dict(head_dim=7), ValueError, "rotary dimension"),
        (dict(head_dim=8, layout="gptj"), ValueError, "layout"),
        (dict(head_dim=8, rotary_dim=3), ValueError, "rotary_dim"),
        (dict(head_dim=8, rotary_dim=10), ValueError, "rotary_dim"),
        (dict(head_dim=8, rotary_dim=4, partial_rotary_factor=0.5), ValueError, "not both"),
        (dict(head_dim=8, base=100.0, rope_parameters={"rope_theta": 1e4}), ValueError, "base"),
        (dict(head_dim=8, rope_type="yarn", factor=2.0), ValueError, "original_max_position_embeddings"),
        (dict(head_dim=8, rope_type="dynamic", factor=2.0), ValueError, "max_len"),
        (dict(head_dim=8, rope_type="dynamic", factor=2.0, original_max_len=8), ValueError, "max_len"),
        (dict(head_dim=8, rope_parameters="yarn"), TypeError, "rope_parameters"),
        (dict(head_dim=8, scaling="yarn"), TypeError, "scaling"),
        (dict(head_dim=8, rope_parameters={"beta": 1}), ValueError, "beta"),
    ],
)
def test_bad_parameters(params, exc, word):
    with pytest.raises(exc, match=word):
        posenc.create("rope", **params)


def test_bad_other_parameters():
    with pytest.raises(ValueError, match="head_dim"):
        posenc.create("rope2d", head_dim=6, grid_width=2)
    with pytest.raises(TypeError, match="grid_width"):
        posenc.create("rope2d", head_dim=8)
    with pytest.raises(ValueError, match="grid_width"):
        posenc.create("rope2d", head_dim=8, grid_width=0)
    with pytest.raises(ValueError, match="gamma"):
        posenc.create("xpos", head_dim=8, gamma=-1.0)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        posenc.create("proportional", head_dim=8, partial_rotary_factor=1.5)


def test_bad_rotate_input():
    pe = posenc.create("rope", head_dim=8)
    q = torch.randn(1, 2, 3, 8)
    p = torch.arange(3)
    with pytest.raises(ValueError, match="head_dim=8"):
        pe.rotate(torch.randn(1, 2, 3, 6), q, p, p)
    with pytest.raises(ValueError, match=r"\[b, h, s, d\]"):
        pe.rotate(q[0], q, p, p)
    with pytest.raises(TypeError, match="floating"):
        pe.rotate(q.long(), q, p, p)
    with pytest.raises(TypeError, match="integer"):
        pe.rotate(q, q, p.float(), p)
    with pytest.raises(ValueError, match="length 4"):
        pe.rotate(q, q, torch.arange(4), p)
    with pytest.raises(ValueError, match="non-negative"):
        pe.rotate(q, q, p - 1, p)
    with pytest.raises(ValueError, match="batch"):
        pe.rotate(q, torch.randn(2, 2, 3, 8), p, p)
    pe2 = posenc.create("rope2d", head_dim=8, grid_width=2)
    with pytest.raises(ValueError, match="q_coords"):
        pe2.rotate_coords(q, q, p, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(2, 3), torch.randn(2, 3))
