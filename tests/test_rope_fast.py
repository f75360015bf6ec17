"""Correctness of the fast rotary path (posenc.functional.rope_fast); no timing here.

References: a plain ``rotate_half`` formula in float64, transformers' Llama
``apply_rotary_pos_emb`` (half layout) and GPT-J ``apply_rotary_pos_emb`` (interleaved),
and hand-derived vectors.
"""

from __future__ import annotations

import math

import pytest
import torch

from posenc.functional import rope_fast
from posenc.functional.rope_fast import apply_rotary


def tables(positions: torch.Tensor, rotary_dim: int, base: float = 10000.0, dtype=torch.float32):
    """Exact cos/sin ``[s, r/2]``: angles in float64, rounded once."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # [r/2]
    theta = positions.to(torch.float64)[..., None] * inv_freq  # [..., s, r/2]
    return theta.cos().to(dtype), theta.sin().to(dtype)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int) -> torch.Tensor:
    """The textbook formula in float64: ``x * cos + rotate_half(x) * sin`` on the first
    ``rotary_dim`` dims (``rotate_every_two`` for the interleaved layout)."""
    x64, c, s = x.double(), cos.double(), sin.double()
    if c.dim() == 3:
        c, s = c[:, None], s[:, None]  # [b, 1, s, r/2]
    xr, rest = x64[..., :rotary_dim], x64[..., rotary_dim:]
    if layout == "half":
        c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    else:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        rotated = torch.stack([-xr[..., 1::2], xr[..., ::2]], dim=-1).flatten(-2)
    return torch.cat([xr * c + rotated * s, rest], dim=-1)


def tol(dtype):
    # bfloat16: the eager path rounds twice (as transformers does): within 2 ulps of |x| <~ 4.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 3e-2}


LAYOUTS = ["half", "interleaved"]


# -- hand-derived vectors ------------------------------------------------------------------
def test_hand_derived_vectors():
    compiled = False  # the compiled path is checked against the float64 formula below
    # d = 4, pair angles θ0 = π/2 (cos 0, sin 1), θ1 = 0 (cos 1, sin 0).
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos, sin = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # half: pairs (0, 2), (1, 3): [1·0 − 3·1, 2·1 − 4·0, 3·0 + 1·1, 4·1 + 2·0]
    q, _ = apply_rotary(x, x, cos, sin, layout="half", compiled=compiled)
    assert q.flatten().tolist() == [-3.0, 2.0, 1.0, 4.0]
    # interleaved: pairs (0, 1), (2, 3): [1·0 − 2·1, 2·0 + 1·1, 3·1 − 4·0, 4·1 + 3·0]
    q, _ = apply_rotary(x, x, cos, sin, layout="interleaved", compiled=compiled)
    assert q.flatten().tolist() == [-2.0, 1.0, 3.0, 4.0]
    # partial rotary r = 2, half: only pair (0, 1) turns by θ0; dims 2, 3 pass through.
    q, _ = apply_rotary(x, x, cos[:, :1], sin[:, :1], layout="half", rotary_dim=2, compiled=compiled)
    assert q.flatten().tolist() == [-2.0, 1.0, 3.0, 4.0]


# -- eager paths against the float64 formula: every layout, partial rotary, dtypes, GQA -------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rotary_dim", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("path", ["small", "large"])
def test_eager_matches_reference(layout, rotary_dim, dtype, inplace, path, monkeypatch):
    # "large": the out=/addcmul_ kernels (and the complex multiply for interleaved float32)
    # that eager uses from AUTO_COMPILE_NUMEL elements on; "small": the three-op decode path.
    if path == "large":
        monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    b, h, h_kv, s, d = 2, 4, 2, 5, 16
    q, k = torch.randn(b, h, s, d, dtype=dtype), torch.randn(b, h_kv, s, d, dtype=dtype)
    cos, sin = tables(torch.arange(3, 3 + s), rotary_dim)
    want_q, want_k = reference(q, cos, sin, layout, rotary_dim), reference(k, cos, sin, layout, rotary_dim)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = apply_rotary(
        q_in, k_in, cos, sin, layout=layout, rotary_dim=rotary_dim, inplace=inplace, compiled=False
    )
    assert got_q.dtype == dtype and got_q.shape == q.shape and got_k.shape == k.shape
    torch.testing.assert_close(got_q.double(), want_q, **tol(dtype))
    torch.testing.assert_close(got_k.double(), want_k, **tol(dtype))
    if inplace:
        assert got_q is q_in and got_k is k_in
    else:
        assert torch.equal(q_in, q) and torch.equal(k_in, k)  # inputs untouched
    if rotary_dim < d:  # pass-through dims are bit-exact
        assert torch.equal(got_q[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize(
    "layout,rotary_dim,dtype,inplace",
    [
        ("half", 16, torch.float32, False),
        ("interleaved", 8, torch.float32, False),
        ("half", 8, torch.bfloat16, True),
        ("interleaved", 16, torch.float32, True),
    ],
)
def test_compiled_matches_reference(layout, rotary_dim, dtype, inplace):
    b, h, h_kv, s, d = 1, 4, 2, 6, 16
    q, k = torch.randn(b, h, s, d, dtype=dtype), torch.randn(b, h_kv, s, d, dtype=dtype)
    cos, sin = tables(torch.arange(s), rotary_dim)
    want_q, want_k = reference(q, cos, sin, layout, rotary_dim), reference(k, cos, sin, layout, rotary_dim)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = apply_rotary(
        q_in, k_in, cos, sin, layout=layout, rotary_dim=rotary_dim, inplace=inplace, compiled=True
    )
    # compiled: float32 arithmetic, rounded once -> within 1 ulp of the float64 result.
    t = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-2}
    torch.testing.assert_close(got_q.double(), want_q, **t)
    torch.testing.assert_close(got_k.double(), want_k, **t)
    if inplace:
        assert got_q is q_in and torch.equal(q_in, got_q)


def test_compiled_cache_once_per_shape():
    rope_fast.clear_compiled_cache()
    cos, sin = tables(torch.arange(4), 8)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    for _ in range(3):
        apply_rotary(q, k, cos, sin, compiled=True)
    assert len(rope_fast._COMPILED) == 1
    apply_rotary(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), cos, sin, compiled=True)  # same shape
    assert len(rope_fast._COMPILED) == 1


def test_auto_compiles_hot_shapes_only(monkeypatch):
    rope_fast.clear_compiled_cache()
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_AFTER", 2)
    q = torch.randn(1, 2, 4, 8)
    for s_k in range(4, 8):  # a KV cache growing by one key per step: never compiled
        cos, sin = tables(torch.arange(s_k), 8)
        apply_rotary(q, torch.randn(1, 1, s_k, 8), cos[-4:], sin[-4:], k_cos=cos, k_sin=sin)
    assert len(rope_fast._COMPILED) == 0
    cos, sin = tables(torch.arange(4), 8)
    for i in range(3):  # the same shape a third time: compiled
        out, _ = apply_rotary(q, q, cos, sin)
        assert len(rope_fast._COMPILED) == (1 if i == 2 else 0)
    torch.testing.assert_close(out.double(), reference(q, cos, sin, "half", 8))


def test_auto_leaves_a_repeated_sweep_over_lengths_eager(monkeypatch):
    """Prefix-by-prefix scoring rotates every prefix length of a window, batch after batch:
    each length comes often in all, but never often among recent calls, so none compiles."""
    rope_fast.clear_compiled_cache()
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_AFTER", 2)
    monkeypatch.setattr(rope_fast, "AUTO_COMPILE_WINDOW", 8)
    cos, sin = tables(torch.arange(12), 8)
    for _batch in range(4):
        for m in range(2, 12):  # 10 lengths, two layers each
            q = torch.randn(1, 2, m, 8)
            for _layer in range(2):
                out, _ = apply_rotary(q, q, cos[:m], sin[:m])
    assert len(rope_fast._COMPILED) == 0
    assert len(rope_fast._RECENT) == 8 and sum(rope_fast._SEEN.values()) == 8
    torch.testing.assert_close(out.double(), reference(q, cos[:11], sin[:11], "half", 8))


# -- transformers ------------------------------------------------------------------------------
def test_matches_transformers_llama():
    compiled = False  # the compiled path equals the formula (test_compiled_matches_reference)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    b, h, h_kv, s, d = 2, 4, 2, 7, 16
    cfg = LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h_kv, max_position_embeddings=64)
    q, k = torch.randn(b, h, s, d), torch.randn(b, h_kv, s, d)
    pos = torch.arange(s).expand(b, s)
    cos_hf, sin_hf = LlamaRotaryEmbedding(cfg)(q, pos)  # [b, s, d]: halves duplicated
    want_q, want_k = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    got_q, got_k = apply_rotary(q, k, cos_hf[..., : d // 2], sin_hf[..., : d // 2], layout="half", compiled=compiled)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_matches_transformers_gptj(rotary_dim):
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    b, h, s, d = 2, 3, 6, 16
    sincos = create_sinusoidal_positions(32, rotary_dim)[torch.arange(s)]  # [s, r]: sin | cos
    sin_hf, cos_hf = torch.split(sincos, rotary_dim // 2, dim=-1)  # [s, r/2] each
    x = torch.randn(b, s, h, d)  # GPT-J keeps [b, s, h, d]
    want = torch.cat([apply_rotary_pos_emb(x[..., :rotary_dim], sin_hf[None], cos_hf[None]), x[..., rotary_dim:]], -1)
    xt = x.transpose(1, 2)  # [b, h, s, d], a strided view
    got, _ = apply_rotary(xt, xt, cos_hf, sin_hf, layout="interleaved", rotary_dim=rotary_dim, compiled=False)
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=1e-5, atol=1e-5)


# -- decoding, batched positions, autograd, outer compile --------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_step_equals_full_forward(layout):
    b, h, h_kv, s, d = 1, 4, 1, 9, 16
    q, k = torch.randn(b, h, s, d), torch.randn(b, h_kv, s, d)
    cos, sin = tables(torch.arange(s), d)
    full_q, full_k = apply_rotary(q, k, cos, sin, layout=layout, compiled=False)
    # last token: q at position s-1, every key re-rotated (s_q = 1 != s_k)
    step_q, step_k = apply_rotary(
        q[:, :, -1:], k, cos[-1:], sin[-1:], layout=layout, k_cos=cos, k_sin=sin, compiled=False
    )
    torch.testing.assert_close(step_q, full_q[:, :, -1:], rtol=0, atol=0)
    torch.testing.assert_close(step_k, full_k, rtol=0, atol=0)


def test_per_batch_positions():
    b, h, s, d = 3, 2, 5, 8
    q = torch.randn(b, h, s, d)
    positions = torch.stack([torch.arange(s) + off for off in (0, 7, 100)])  # [b, s]: left-padded offsets
    cos, sin = tables(positions, d)  # [b, s, r/2]
    got, _ = apply_rotary(q, q, cos, sin, compiled=False)
    for i in range(b):
        c, s_ = tables(positions[i], d)
        torch.testing.assert_close(got[i : i + 1], reference(q[i : i + 1], c, s_, "half", d).float())


@pytest.mark.parametrize("path", ["small", "large", "compiled"])
def test_gradients_equal_reference(path, monkeypatch):
    # RoPE is a rotation: the gradient is the inverse rotation of the upstream gradient.
    if path == "large":
        monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    compiled = path == "compiled"
    b, h, s, d = 1, 2, 4, 8
    q = torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, 1, s, d, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(torch.arange(s), 6, dtype=torch.float64)
    gq, gk = torch.randn(b, h, s, d, dtype=torch.float64), torch.randn(b, 1, s, d, dtype=torch.float64)
    out_q, out_k = apply_rotary(q, k, cos, sin, layout="interleaved", rotary_dim=6, compiled=compiled)
    torch.autograd.backward([out_q, out_k], [gq, gk])
    want_gq = reference(gq, cos, -sin, "interleaved", 6)  # R(-θ) = R(θ)ᵀ
    torch.testing.assert_close(q.grad, want_gq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.grad, reference(gk, cos, -sin, "interleaved", 6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["small", "large"])
def test_gradcheck_eager_inplace_on_nonleaf(path, monkeypatch):
    if path == "large":
        monkeypatch.setattr(rope_fast, "AUTO_COMPILE_NUMEL", 0)
    cos, sin = tables(torch.arange(3), 4, dtype=torch.float64)
    q0 = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(q0, k0):
        return apply_rotary(q0 * 1.0, k0 * 1.0, cos, sin, inplace=True, compiled=False)

    assert torch.autograd.gradcheck(f, (q0, k0))


def test_inside_outer_compile_equals_eager():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    cos, sin = tables(torch.arange(4), 8)

    @torch.compile(fullgraph=True, dynamic=False)
    def outer(q, k):
        qr, kr = apply_rotary(q, k, cos, sin, layout="half")
        return qr @ kr.transpose(-1, -2)

    torch.testing.assert_close(
        outer(q, k),
        reference(q, cos, sin, "half", 8).float() @ reference(k, cos, sin, "half", 8).float().transpose(-1, -2),
    )


def test_scores_depend_only_on_offset():
    # q_m · k_n after rotation depends on m − n only (RoPE's relative property).
    d = 8
    u, v = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    scores = []
    for m, n in [(3, 1), (10, 8), (1000, 998)]:
        cq, sq = tables(torch.tensor([m]), d)
        ck, sk = tables(torch.tensor([n]), d)
        qr, kr = apply_rotary(u, v, cq, sq, k_cos=ck, k_sin=sk, layout="interleaved", compiled=False)
        scores.append(float((qr * kr).sum()))
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and scores[0] == pytest.approx(scores[2], abs=1e-4)
    assert math.isfinite(scores[0])


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    cos, sin = tables(torch.arange(4), 8)
    with pytest.raises(ValueError, match="layout"):
        apply_rotary(q, k, cos, sin, layout="neox")
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(q, k, cos, sin, rotary_dim=7)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(q, k, cos, sin, rotary_dim=10)
    with pytest.raises(TypeError, match="rotary_dim"):
        apply_rotary(q, k, cos, sin, rotary_dim=4.0)
    with pytest.raises(ValueError, match=r"cos/sin must have shape \[s, rotary_dim/2\]"):
        apply_rotary(q, k, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))  # [s, r]: duplicated halves
    with pytest.raises(ValueError, match="same shape"):
        apply_rotary(q, k, cos, sin[:, :2])
    with pytest.raises(ValueError, match="k_cos"):
        apply_rotary(q, torch.randn(1, 1, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="together"):
        apply_rotary(q, k, cos, sin, k_cos=cos)
    with pytest.raises(ValueError, match="head_dim"):
        apply_rotary(q, torch.randn(1, 1, 4, 6), cos, sin)
    with pytest.raises(ValueError, match="batch size"):
        apply_rotary(q, torch.randn(2, 1, 4, 8), cos, sin)
    with pytest.raises(ValueError, match=r"\[b, h, s, d\]"):
        apply_rotary(q[0], k, cos, sin)
    with pytest.raises(TypeError, match="dtype"):
        apply_rotary(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match="floating"):
        apply_rotary(q.long(), k.long(), cos, sin)
    with pytest.raises(TypeError, match="cos"):
        apply_rotary(q, k, cos.numpy(), sin)
    with pytest.raises(ValueError, match="compiled"):
        apply_rotary(q, k, cos, sin, compiled="yes")
    with pytest.raises(TypeError, match="inplace"):
        apply_rotary(q, k, cos, sin, inplace=1)
    with pytest.raises(ValueError, match="cos/sin must have shape"):
        apply_rotary(q, k, cos.expand(2, 4, 4), sin.expand(2, 4, 4))
