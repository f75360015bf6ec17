"""Relative / bias / contextual encodings: hand-derived values, score_mod == bias,
KV-cache decoding, references (transformers T5 buckets, Bloom slopes), gradients,
bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import posenc
from posenc.functional import relative
from posenc.functional.relative import materialize_score_mod

BIAS_CONFIGS = {
    "t5-causal": ("t5", dict(num_heads=3, num_buckets=8, max_distance=6, causal=True)),
    "t5-bidir": ("t5", dict(num_heads=3, num_buckets=8, max_distance=6, causal=False)),
    "alibi-causal": ("alibi", dict(num_heads=3, causal=True)),
    "alibi-sym": ("alibi", dict(num_heads=3, causal=False)),
    "kerple-log": ("kerple", dict(num_heads=3, variant="log")),
    "kerple-power": ("kerple", dict(num_heads=3, variant="power")),
    "fire": ("fire", dict(num_heads=3, mlp_width=8, init_L=4.0)),
    "sandwich": ("sandwich", dict(num_heads=3, sin_dim=8)),
}
NEW = ["t5", "alibi", "kerple", "fire", "sandwich", "shaw", "cope"]


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial learned values (CoPE starts at zero; KERPLE must stay positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1] in ("r1", "r2"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.1)
            elif name.endswith("c") or name.endswith("L_multiplier"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make(key: str) -> posenc.PositionalEncoding:
    name, params = BIAS_CONFIGS[key]
    pe = posenc.create(name, **params)
    _randomize(pe)
    return pe


# -- hand-derived values -------------------------------------------------------------
def test_alibi_slopes_paper_rule():
    # powers of two: 2^(-8i/n)
    torch.testing.assert_close(relative.alibi_slopes(2), torch.tensor([2**-4, 2**-8]))
    torch.testing.assert_close(relative.alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    # 3 heads: slopes of 2, then the odd-indexed slopes of 4: 2^-2
    torch.testing.assert_close(relative.alibi_slopes(3), torch.tensor([2**-4, 2**-8, 2**-2]))
    # 6 heads: slopes of 4, then from the 8-head slopes 2^-1, 2^-3
    torch.testing.assert_close(relative.alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


def test_alibi_bias_matrix():
    pe = posenc.create("alibi", num_heads=2, causal=True)
    b = pe.bias(torch.arange(3), torch.arange(3))
    d = torch.tensor([[0.0, 1, 2], [-1, 0, 1], [-2, -1, 0]])  # -(i - j)
    torch.testing.assert_close(b, torch.stack([d / 16, d / 256]))
    sym = posenc.create("alibi", num_heads=2, causal=False).bias(torch.arange(3), torch.arange(3))
    torch.testing.assert_close(sym, torch.stack([-d.abs() / 16, -d.abs() / 256]))


def test_t5_causal_buckets_by_hand():
    # num_buckets=4, max_distance=8: max_exact=2; r >= 2 -> 2 + floor(log(r/2)/log(4) * 2), capped at 3
    pe = posenc.create("t5", num_heads=2, num_buckets=4, max_distance=8, causal=True)
    got = pe.buckets(torch.tensor([9]), torch.arange(12))[0]  # distances 9..0, then future keys
    expected_by_distance = [0, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert got.tolist() == expected_by_distance[::-1] + [0, 0]
    with torch.no_grad():
        pe.weight.copy_(torch.tensor([[0.0, 10], [1, 11], [2, 12], [3, 13]]))
    b = pe.bias(torch.tensor([4]), torch.arange(5))  # distances 4,3,2,1,0
    torch.testing.assert_close(b, torch.tensor([[[3.0, 2, 2, 1, 0]], [[13.0, 12, 12, 11, 10]]]))


def test_t5_bidirectional_buckets_by_hand():
    # num_buckets=8: 4 per direction, keys after the query offset by 4; max_exact=2
    pe = posenc.create("t5", num_heads=1, num_buckets=8, max_distance=8, causal=False)
    rel = torch.tensor([-9, -4, -3, -2, -1, 0, 1, 2, 3, 4, 9])
    got = relative.t5_bucket(rel, bidirectional=True, num_buckets=8, max_distance=8)
    assert got.tolist() == [3, 3, 2, 2, 1, 0, 5, 6, 6, 7, 7]
    assert pe.buckets(torch.tensor([5]), torch.tensor([4, 6]))[0].tolist() == [1, 5]


def test_kerple_by_hand():
    d = torch.arange(4.0)
    pe = posenc.create("kerple", num_heads=2, variant="log")
    with torch.no_grad():
        pe.r1.copy_(torch.tensor([1.0, 2.0]))
        pe.r2.copy_(torch.tensor([1.0, 0.5]))
    b = pe.bias(torch.tensor([3]), torch.arange(4))[:, 0]  # distances 3,2,1,0
    expected = torch.tensor(
        [[-math.log(1 + x) for x in (3, 2, 1, 0)], [-2 * math.log(1 + 0.5 * x) for x in (3, 2, 1, 0)]]
    )
    torch.testing.assert_close(b, expected)
    pw = posenc.create("kerple", num_heads=1, variant="power")
    with torch.no_grad():
        pw.r1.fill_(2.0)
        pw.r2.fill_(1.5)
    b = pw.bias(torch.tensor([3]), torch.arange(4))[0, 0]
    torch.testing.assert_close(b, -2 * d.flip(0) ** 1.5)
    with torch.no_grad():
        pw.r2.fill_(5.0)  # clamped to 2 (the kernel is conditionally positive definite only for r2 <= 2)
    torch.testing.assert_close(pw.bias(torch.tensor([3]), torch.arange(4))[0, 0], -2 * d.flip(0) ** 2)


def test_fire_by_hand():
    pe = posenc.create("fire", num_heads=2, mlp_width=1, init_c=1.0, init_L=2.0, eps=1e-6)
    with torch.no_grad():
        pe.mlp[0].weight.fill_(1.0)
        pe.mlp[0].bias.fill_(0.0)
        pe.mlp[2].weight.copy_(torch.tensor([[1.0], [2.0]]))
        pe.mlp[2].bias.copy_(torch.tensor([0.0, 0.5]))
    b = pe.bias(torch.arange(4), torch.arange(4)).detach()

    def x(i, j):  # log(|i-j| + 1) / (log(max(i, L) + 1) + eps), L = 2
        return math.log(abs(i - j) + 1) / (math.log(max(i, 2) + 1) + 1e-6)

    expected = torch.tensor([[[x(i, j) * w + c for j in range(4)] for i in range(4)] for w, c in ((1, 0), (2, 0.5))])
    torch.testing.assert_close(b, expected)
    assert abs(float(b[0, 3, 0].detach()) - 1.0) < 1e-5  # psi(3)/psi(max(3, 2)) = 1


def test_sandwich_by_hand():
    pe = posenc.create("sandwich", num_heads=2, sin_dim=4)  # frequencies 10000^-0.5, 10000^-1
    b = pe.bias(torch.arange(3), torch.arange(3))
    w1, w2 = 0.01, 1e-4

    def k(d):
        return math.cos(d * w1) + math.cos(d * w2) - 2

    expected = torch.tensor([[[k(i - j) / div for j in range(3)] for i in range(3)] for div in (4.0, 8.0)])
    torch.testing.assert_close(b, expected)
    assert float(b[:, 1, 1].abs().max()) == 0.0 and bool((b <= 0).all())


def test_shaw_by_hand():
    pe = posenc.create("shaw", head_dim=2, max_distance=1)
    with torch.no_grad():
        pe.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # rel -1, 0, +1
    q = torch.tensor([1.0, 2.0]).expand(1, 1, 3, 2)
    b = pe.bias(torch.arange(3), torch.arange(3), q=q)
    z = torch.tensor([1.0, 2.0, 3.0]) / math.sqrt(2)  # q · w[rel]
    rel = torch.tensor([[0, 1, 1], [-1, 0, 1], [-1, -1, 0]])  # clip(j - i, -1, 1)
    torch.testing.assert_close(b[0, 0], z[rel + 1])


def test_cope_by_hand():
    pe = posenc.create("cope", head_dim=1, npos_max=4, causal=True)
    with torch.no_grad():
        pe.pos_emb.copy_(torch.tensor([[0.0, 1.0, 4.0, 9.0]]))  # e[n] = n^2, q = 1 -> z[n] = n^2
    q = torch.ones(1, 1, 4, 1)
    k = torch.zeros(1, 1, 4, 1)  # every gate sigmoid(0) = 1/2
    b = pe.bias(torch.arange(4), torch.arange(4), q=q, k=k)[0, 0]
    # p_ij = (i - j + 1) / 2 for j <= i, 0 for masked keys; z interpolated linearly between n^2
    z = {0.0: 0.0, 0.5: 0.5, 1.0: 1.0, 1.5: 2.5, 2.0: 4.0}
    expected = torch.tensor([[z[(i - j + 1) / 2] if j <= i else 0.0 for j in range(4)] for i in range(4)])
    torch.testing.assert_close(b, expected)
    # clamp at npos_max - 1 = 3: 8 keys of gate 1/2 reach 4 -> clamped
    pos = pe.positions(torch.ones(1, 1, 8, 1), torch.zeros(1, 1, 8, 1))
    assert float(pos[0, 0, 7, 0]) == 3.0 and float(pos[0, 0, 7, 7]) == 0.5


# -- score_mod equals bias -----------------------------------------------------------
@pytest.mark.parametrize("key", sorted(BIAS_CONFIGS))
def test_score_mod_equals_bias(key):
    pe = make(key)
    for qp, kp in [
        (torch.arange(7), torch.arange(7)),
        (torch.arange(20, 23), torch.arange(0, 23)),  # KV-cache step
        (torch.tensor([[3, 4, 9], [0, 5, 6]]), torch.tensor([[0, 1, 2, 3, 4, 9], [0, 0, 1, 2, 5, 6]])),  # [b, s]
    ]:
        b = pe.bias(qp, kp)
        batch = qp.shape[0] if qp.dim() == 2 else 1
        sm = materialize_score_mod(pe.score_mod(qp, kp), batch, 3, qp.shape[-1], kp.shape[-1])
        torch.testing.assert_close(sm, b.expand_as(sm), rtol=1e-5, atol=1e-6)


def test_shaw_score_mod_equals_bias():
    pe = posenc.create("shaw", head_dim=4, max_distance=2)
    _randomize(pe)
    q = torch.randn(2, 3, 5, 4)
    qp, kp = torch.arange(4, 9), torch.arange(9)
    b = pe.bias(qp, kp, q=q)
    sm = materialize_score_mod(pe.score_mod(qp, kp, q=q), 2, 3, 5, 9)
    torch.testing.assert_close(sm, b, rtol=1e-5, atol=1e-6)


# -- KV cache == full forward --------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("causal", [True, False])
def test_kv_cache_matches_full_forward(name, causal):
    torch.manual_seed(0)
    # A bidirectional model's cached layer-2 keys saw only earlier tokens: compare one layer.
    layers = 2 if causal else 1
    cfg = posenc.TransformerConfig(vocab_size=40, dim=24, num_heads=3, num_layers=layers, encoding=name, causal=causal)
    model = posenc.Transformer(cfg).eval()
    _randomize(model.pe, seed=1)
    tokens = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, i : i + 1], cache=cache) for i in range(9)]  # token by token
        chunked = model.new_cache()
        chunks = [model(tokens[:, :4], cache=chunked), model(tokens[:, 4:], cache=chunked)]  # prefill + chunk
    if causal:
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)
    else:  # a bidirectional model's last step sees every token
        torch.testing.assert_close(steps[-1][:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chunks[-1][:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


# -- references: Hugging Face transformers -------------------------------------------
_T5_SETTINGS = [(32, 128), (8, 20), (2, 10), (5, 7), (64, 300), (31, 100), (4, 3)]


@pytest.mark.parametrize(
    "num_buckets,max_distance,causal",
    # a bidirectional T5 splits its buckets by direction, so it needs at least 4
    [(n, m, c) for n, m in _T5_SETTINGS for c in (True, False) if c or n >= 4],
)
def test_t5_buckets_equal_transformers(num_buckets, max_distance, causal):
    from transformers.models.t5 import modeling_t5 as t5  # a dev dependency: missing is a failure

    # every setting here is one posenc accepts (rejected ones are tested in bad input)
    assert max_distance > relative.t5_max_exact(num_buckets, not causal), (num_buckets, max_distance, causal)
    rel = torch.arange(-4096, 4097)
    ref = t5.T5Attention._relative_position_bucket(
        rel, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance
    )
    pe = posenc.create("t5", num_heads=1, num_buckets=num_buckets, max_distance=max_distance, causal=causal)
    got = pe.buckets(torch.tensor([4096]), torch.arange(0, 8193))[0]  # k - q = -4096..4096
    assert torch.equal(got, ref)
    # the lookup table used by bias/score_mod gives the same ids
    idx = rel.clamp(-max_distance, max_distance) + max_distance
    assert torch.equal(pe.bucket_table[idx], ref)


def test_alibi_slopes_equal_bloom():
    from transformers.models.bloom import modeling_bloom as bloom  # a dev dependency: missing is a failure

    for h in range(1, 129):
        alibi = bloom.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), h, torch.float32)  # [h, 1, 2]
        torch.testing.assert_close(relative.alibi_slopes(h), alibi[:, 0, 1], rtol=1.3e-6, atol=0.0)


# -- gradients -----------------------------------------------------------------------
class _Call(nn.Module):
    def __init__(self, pe, fn):
        super().__init__()
        self.pe, self.fn = pe, fn

    def forward(self, *args):
        return self.fn(self.pe, *args)


def _gradcheck_params(pe, fn, *inputs):
    pe = pe.double()
    wrapper = _Call(pe, fn)
    names = [n for n, _ in wrapper.named_parameters()]
    assert names, "no learned parameters"
    params = [p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters()]

    def f(*ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps[: len(names)], strict=True)), ps[len(names) :])

    assert torch.autograd.gradcheck(f, (*params, *inputs), eps=1e-6, atol=1e-5)
    out = f(*params, *inputs)
    grads = torch.autograd.grad(out.sum() + (out**2).sum(), params, allow_unused=True)
    for n, g in zip(names, grads, strict=True):
        assert g is not None and bool(g.abs().sum() > 0), f"no gradient reaches {n}"


@pytest.mark.parametrize("key", ["t5-causal", "t5-bidir", "kerple-log", "kerple-power", "fire"])
@pytest.mark.parametrize("via", ["bias", "score_mod"])
def test_gradients_reach_learned_parameters(key, via):
    pe = make(key)
    qp, kp = torch.arange(2, 6), torch.arange(6)
    if via == "bias":
        _gradcheck_params(pe, lambda m: m.bias(qp, kp))
    else:
        _gradcheck_params(pe, lambda m: materialize_score_mod(m.score_mod(qp, kp), 1, 3, 4, 6))


@pytest.mark.parametrize("via", ["bias", "score_mod"])
def test_shaw_gradients(via):
    pe = posenc.create("shaw", head_dim=3, max_distance=2)
    _randomize(pe)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    qp, kp = torch.arange(4), torch.arange(4)
    if via == "bias":
        _gradcheck_params(pe, lambda m, q: m.bias(qp, kp, q=q), q)
    else:
        _gradcheck_params(pe, lambda m, q: materialize_score_mod(m.score_mod(qp, kp, q=q), 1, 2, 4, 4), q)


def test_cope_gradients():
    pe = posenc.create("cope", head_dim=3, npos_max=4)
    _randomize(pe)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(1, 1, 4, 3, dtype=torch.float64, generator=g).requires_grad_()  # GQA: 1 key head
    pos = torch.arange(4)
    _gradcheck_params(pe, lambda m, q, k: m.bias(pos, pos, q=q, k=k), q, k)


# -- bad input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params,err,word",
    [
        ("t5", dict(num_heads=2, num_buckets=1), ValueError, "num_buckets"),
        ("t5", dict(num_heads=2, max_distance=0), ValueError, "max_distance"),
        ("t5", dict(num_heads=2, max_distance=-5), ValueError, "max_distance"),
        ("t5", dict(num_heads=2, num_buckets=32, max_distance=8, causal=False), ValueError, "max_distance"),
        ("t5", dict(num_heads=2, causal="yes"), TypeError, "causal"),
        ("t5", dict(num_heads=0), ValueError, "num_heads"),
        ("alibi", dict(num_heads=2.5), TypeError, "num_heads"),
        ("kerple", dict(num_heads=2, variant="exp"), ValueError, "variant"),
        ("kerple", dict(num_heads=2, eps=0.0), ValueError, "eps"),
        ("fire", dict(num_heads=2, init_c=-1.0), ValueError, "init_c"),
        ("sandwich", dict(num_heads=2, sin_dim=7), ValueError, "sin_dim"),
        ("shaw", dict(head_dim=4, max_distance=-1), ValueError, "max_distance"),
        ("cope", dict(head_dim=4, npos_max=1), ValueError, "npos_max"),
        ("alibi", dict(num_heads=2, slope=3), TypeError, "slope"),
    ],
)
def test_bad_parameters(name, params, err, word):
    with pytest.raises(err, match=word):
        posenc.create(name, **params)


@pytest.mark.parametrize("key", ["t5-causal", "alibi-causal", "kerple-log", "fire", "sandwich"])
def test_bad_positions(key):
    pe = make(key)
    with pytest.raises(TypeError, match="integer"):
        pe.bias(torch.arange(3.0), torch.arange(3))
    with pytest.raises(TypeError, match="integer"):
        pe.score_mod(torch.arange(3), torch.arange(3.0))
    with pytest.raises(ValueError, match="non-negative"):
        pe.bias(torch.tensor([-1, 0]), torch.arange(3))
    with pytest.raises(ValueError, match="batch"):
        pe.bias(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))


def test_mismatched_head_counts():
    with pytest.raises(ValueError, match="num_heads=3"):
        posenc.Attention(32, 4, pe=posenc.create("alibi", num_heads=3))
    cfg = posenc.TransformerConfig(vocab_size=10, dim=32, num_heads=4, encoding="t5", encoding_params={"num_heads": 2})
    with pytest.raises(ValueError, match="num_heads=2"):
        posenc.Transformer(cfg)


def test_content_encodings_need_content():
    with pytest.raises(ValueError, match="q="):
        posenc.create("shaw", head_dim=4).bias(torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="head_dim"):
        posenc.create("shaw", head_dim=4).bias(torch.arange(3), torch.arange(3), q=torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="q=q, k=k"):
        posenc.create("cope", head_dim=4).bias(torch.arange(3), torch.arange(3), q=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="head counts"):
        posenc.create("cope", head_dim=4).bias(
            torch.arange(3), torch.arange(3), q=torch.randn(1, 3, 3, 4), k=torch.randn(1, 2, 3, 4)
        )


def test_registry_metadata():
    for name in NEW:
        cls = posenc.get(name)
        assert cls.reference and cls.formula and cls.flaw and cls.__doc__
    assert posenc.get("shaw").family == "relative" and posenc.get("cope").family == "contextual"
    assert {posenc.get(n).family for n in ("t5", "alibi", "kerple", "fire", "sandwich")} == {"bias"}
