"""The FlexAttention backend: block masks and score_mods give SDPA's outputs, the
compiled path matches, and what FlexAttention cannot do on CPU raises clearly."""

from __future__ import annotations

import warnings

import pytest
import torch

import posenc
from posenc import flex
from posenc.attention import build_mask

ENCODINGS = {
    "t5": dict(num_heads=4, num_buckets=8, max_distance=20),
    "alibi": dict(num_heads=4),
    "kerple": dict(num_heads=4, variant="power"),
    "fire": dict(num_heads=4, mlp_width=4, init_L=8.0),
    "sandwich": dict(num_heads=4, sin_dim=16),
    "shaw": dict(head_dim=8, max_distance=3),
}


def _eager_flex(q, k, v, score_mod, mask, gqa):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": fine for a reference
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=gqa)


def _randomized(name: str) -> posenc.PositionalEncoding:
    torch.manual_seed(0)
    pe = posenc.create(name, **ENCODINGS[name])
    with torch.no_grad():
        for n, p in pe.named_parameters():
            p.copy_(torch.rand_like(p) + 0.2 if n in ("r1", "r2") else torch.randn_like(p) * 0.5)
    return pe


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("s_q,s_k,causal", [(150, 150, True), (150, 150, False), (1, 200, True), (3, 131, True)])
def test_block_mask_and_score_mod_equal_sdpa(name, s_q, s_k, causal):
    """Uncompiled flex_attention (same semantics as the kernel) with the backend's
    block mask, key padding and score_mod vs SDPA with the materialized bias and mask."""
    pe = _randomized(name)
    b, h, h_kv, d = 2, 4, 2, 8
    q, k, v = torch.randn(b, h, s_q, d), torch.randn(b, h_kv, s_k, d), torch.randn(b, h_kv, s_k, d)
    qp, kp = torch.arange(s_k - s_q, s_k), torch.arange(s_k)
    bias = pe.bias(qp, kp, q=q, k=k)
    mask = build_mask(b, s_q, s_k, causal=causal, padding=None, segment_ids=None, device=q.device)
    attn = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn, enable_gqa=True)

    kk, vv, kpp = flex.pad_keys(k, v, kp, s_q)
    assert kk.shape[2] % (flex.BLOCK_SIZE if s_q < s_k else flex.CPU_KEY_MULTIPLE) == 0
    bm = flex.block_mask(
        b, s_q, kk.shape[2], n_keys=s_k, causal=causal, padding=None, segment_ids=None, device=q.device
    )
    out = _eager_flex(q, kk, vv, pe.score_mod(qp, kpp, q=q, k=kk), bm, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_block_mask_with_padding_and_segments():
    pe = _randomized("alibi")
    b, h, s, d = 2, 4, 140, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    pos = torch.arange(s)
    padding = torch.ones(b, s, dtype=torch.bool)
    padding[0, :5] = False  # left padding
    segments = torch.zeros(b, s, dtype=torch.long)
    segments[1, 70:] = 1  # two packed documents
    mask = build_mask(b, s, s, causal=True, padding=padding, segment_ids=segments, device=q.device)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=pe.bias(pos, pos).masked_fill(~mask, float("-inf"))
    )
    bm = flex.block_mask(b, s, s, n_keys=s, causal=True, padding=padding, segment_ids=segments, device=q.device)
    out = _eager_flex(q, k, v, pe.score_mod(pos, pos), bm, False)
    # rows of padding queries see nothing: SDPA (mask opened) and flex (zeros) differ there only
    torch.testing.assert_close(out[0, :, 5:], ref[0, :, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_block_mask_padding_with_padded_cache_keys():
    """A decode step over a left-padded cache: key padding and the 128-multiple key
    padding of the backend combine (create_block_mask path)."""
    pe = _randomized("t5")
    b, h, n, d = 2, 4, 200, 8
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    padding = torch.ones(b, n, dtype=torch.bool)
    padding[1, :7] = False
    qp, kp = torch.tensor([n - 1]), torch.arange(n)
    mask = build_mask(b, 1, n, causal=True, padding=padding, segment_ids=None, device=q.device)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=pe.bias(qp, kp).masked_fill(~mask, float("-inf"))
    )
    kk, vv, kpp = flex.pad_keys(k, v, kp, 1)
    bm = flex.block_mask(b, 1, kk.shape[2], n_keys=n, causal=True, padding=padding, segment_ids=None, device=q.device)
    out = _eager_flex(q, kk, vv, pe.score_mod(qp, kpp), bm, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _models(name: str, **cfg):
    torch.manual_seed(0)
    base = dict(vocab_size=50, dim=32, num_heads=4, num_layers=2, encoding=name, **cfg)
    sdpa = posenc.Transformer(posenc.TransformerConfig(**base)).eval()
    with torch.no_grad():
        for p in sdpa.pe.parameters():
            p.add_(torch.rand_like(p) * 0.3)
    fx = posenc.Transformer(posenc.TransformerConfig(**base, backend="flex")).eval()
    fx.load_state_dict(sdpa.state_dict())
    return sdpa, fx


def _compiled_matches(name: str) -> None:
    sdpa, fx = _models(name)
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        ref = sdpa(tokens)
        torch.testing.assert_close(fx(tokens), ref, rtol=1e-4, atol=1e-5)
        cache = fx.new_cache()
        steps = [fx(tokens[:, :8], cache=cache)] + [fx(tokens[:, i : i + 1], cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_flex_model_matches_sdpa_alibi():
    """torch.compile'd FlexAttention: full forward and KV-cache decoding equal SDPA."""
    _compiled_matches("alibi")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5", "kerple", "fire", "sandwich", "shaw"])
def test_compiled_flex_model_matches_sdpa(name):
    _compiled_matches(name)


def test_padded_length():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert flex.padded_length(1, 200, cpu) == 256  # KV cache: whole 128-key blocks
    assert flex.padded_length(8, 8, cpu) == 16  # CPU: whole micro-GEMM N blocks
    assert flex.padded_length(32, 32, cpu) == 32
    assert flex.padded_length(8, 8, meta) == 8  # other devices: no padding without a cache


@pytest.mark.slow
@pytest.mark.parametrize("s", [8, 24])
def test_compiled_flex_key_tail_of_one_avx2_vector(s):
    """Key lengths 8 and 24 at head_dim 8: the CPU micro-GEMM's N tail that is wrong on
    AVX2 (see posenc.flex); the backend pads the keys, so the result equals SDPA."""
    torch.manual_seed(0)
    attn = posenc.Attention(32, 4, pe=posenc.create("alibi", num_heads=4), backend="flex").eval()
    ref = posenc.Attention(32, 4, pe=posenc.create("alibi", num_heads=4)).eval()
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, s, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref(x), rtol=1e-4, atol=1e-5)


_AVX2_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
import test_flex
test_flex._compiled_matches("alibi")
for s in (8, 24):
    test_flex.test_compiled_flex_key_tail_of_one_avx2_vector(s)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs an x86 CPU with AVX2"
)
def test_compiled_flex_on_the_avx2_path(tmp_path):
    """The compiled model and the key tails again with PyTorch's kernels and Inductor's
    code generated for AVX2 (``ATEN_CPU_CAPABILITY=avx2``), so an AVX-512 machine also
    tests the path that an AVX2-only CPU takes."""
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    here = str(pathlib.Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT, here], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]


# -- what FlexAttention cannot do here -----------------------------------------------
def test_flex_backward_on_cpu_raises():
    _, fx = _models("alibi")
    with pytest.raises(NotImplementedError, match="no backward on CPU.*torch.no_grad.*sdpa"):
        fx(torch.randint(0, 50, (1, 8)))


def test_flex_cope_raises():
    _, fx = _models("cope")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="cope cannot run on backend='flex'.*sdpa"):
        fx(torch.randint(0, 50, (1, 8)))


def test_flex_dropout_and_materialized_bias_raise():
    attn = posenc.Attention(16, 2, pe=posenc.create("alibi", num_heads=2), backend="flex", dropout=0.1)
    x = torch.randn(1, 4, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="dropout"):
        attn(x)
    attn.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="materialized bias"):
        attn(x, bias=torch.zeros(2, 4, 4))


def test_bias_without_score_mod_is_refused():
    class OnlyBias(posenc.PositionalEncoding):
        name = "only-bias-test"

        def bias(self, q_positions, k_positions, *, q=None, k=None):
            return torch.zeros(1, q_positions.shape[-1], k_positions.shape[-1])

    attn = posenc.Attention(8, 1, pe=OnlyBias(), backend="flex").eval()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="no score_mod"):
        attn(torch.randn(1, 3, 8))
    assert posenc.create("none").score_mod(torch.arange(2), torch.arange(2)) is None  # no bias: no score_mod


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="flex"):
        posenc.Attention(8, 1, backend="xformers")
