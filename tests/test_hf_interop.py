"""posenc.interop.hf: tiny transformers models (random weights, built locally) patched to
use posenc's RoPE give the same logits for every rope_type; q/k weight permutation
between layouts gives the same attention."""

from __future__ import annotations

import pytest
import torch
import transformers

import posenc
from posenc.functional.rope import interleaved_to_half_permutation
from posenc.interop import hf

transformers.logging.set_verbosity_error()

MPE = 16  # tiny max_position_embeddings; the test sequences go past it
SEQ = 40

SCALINGS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 8},
    "yarn-deepseek": {
        "rope_type": "yarn",
        "factor": 4.0,
        "rope_theta": 500.0,
        "original_max_position_embeddings": 8,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 8.0,
        "beta_slow": 1.0,
    },
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 8,
        "factor": 4.0,
        "short_factor": [1.0, 1.2, 1.5, 2.0],
        "long_factor": [2.0, 3.0, 5.0, 9.0],
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "rope_theta": 500.0,
        "original_max_position_embeddings": 8,
    },
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
}


def _llama(rope_parameters, cls="llama"):
    common = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MPE,
        rope_parameters=dict(rope_parameters),
    )
    if cls == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))


def _sharpen(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "query_key_value")):
                p.mul_(10)
    return model


def _compare(model, *, expect_equal=True, pe=None):
    tokens = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
        names = hf.patch_rope(model, pe)
        out = model(tokens).logits
    assert names and all(isinstance(model.get_submodule(n), hf.PosencRotaryEmbedding) for n in names)
    if expect_equal:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return ref, out


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_llama_patched_logits_equal(scaling):
    torch.manual_seed(0)
    _compare(_sharpen(_llama(SCALINGS[scaling]).eval()))


@pytest.mark.parametrize("scaling", ["default", "yarn", "dynamic", "longrope"])
def test_qwen2_patched_logits_equal(scaling):
    torch.manual_seed(1)
    _compare(_sharpen(_llama(SCALINGS[scaling], cls="qwen2").eval()))


@pytest.mark.parametrize("scaling", ["default", "linear", "dynamic", "yarn", "llama3"])
def test_gpt_neox_partial_rotary_patched_logits_equal(scaling):
    torch.manual_seed(2)
    params = {k: v for k, v in SCALINGS[scaling].items()}
    cfg = transformers.GPTNeoXConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 16, rotary 8: 4 frequencies
        max_position_embeddings=MPE,
        rotary_pct=0.5,
        rope_parameters=params,
    )
    model = _sharpen(transformers.GPTNeoXForCausalLM(cfg).eval())
    assert hf.rope_from_config(model.config).cfg.rotary_dim == 8
    _compare(model)


def test_patch_with_another_rope_changes_logits():
    # the patch really routes the model through posenc: a different base changes the logits
    torch.manual_seed(0)
    model = _sharpen(_llama(SCALINGS["default"]).eval())
    other = posenc.create("rope", head_dim=8, base=10.0)
    ref, out = _compare(model, expect_equal=False, pe=other)
    assert (ref - out).abs().max() > 1e-2


def test_rope_from_config_matches_hf_rotary_embedding():
    model = _llama(SCALINGS["yarn"])
    pe = hf.rope_from_config(model.config)
    pos = torch.arange(30)[None]
    x = torch.zeros(1, 30, 8)
    ref_cos, ref_sin = model.model.rotary_emb(x, pos)
    cos, sin = hf.PosencRotaryEmbedding(pe)(x, pos)
    torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=1e-5, atol=1e-6)


def test_adapter_rejects_interleaved_and_nested():
    with pytest.raises(ValueError, match="half"):
        hf.PosencRotaryEmbedding(posenc.create("rope", head_dim=8, layout="interleaved"))
    with pytest.raises(TypeError, match="RoPE"):
        hf.PosencRotaryEmbedding(posenc.create("xpos", head_dim=8))
    model = _llama(SCALINGS["default"])
    with pytest.raises(ValueError, match="frequencies"):
        hf.patch_rope(model, posenc.create("rope", head_dim=16))
    with pytest.raises(ValueError, match="rotary_emb"):
        hf.patch_rope(torch.nn.Linear(2, 2), posenc.create("rope", head_dim=8))


# -- layout conversion of q/k weights ----------------------------------------------------
def test_permutation_hand():
    # head_dim 6, rotary 4: interleaved pairs (0,1), (2,3) -> half pairs (0,2), (1,3)
    torch.testing.assert_close(interleaved_to_half_permutation(6, 4), torch.tensor([0, 2, 1, 3, 4, 5]))


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_permuted_weights_give_equal_attention(rotary_dim):
    torch.manual_seed(0)
    dim, heads, kv_heads, head_dim = 48, 4, 2, 12
    rd = 12 if rotary_dim is None else rotary_dim
    inter = posenc.create("rope", head_dim=head_dim, layout="interleaved", rotary_dim=rd)
    half = posenc.create("rope", head_dim=head_dim, layout="half", rotary_dim=rd)
    a = posenc.Attention(dim, heads, num_kv_heads=kv_heads, pe=inter, qkv_bias=True)
    b = posenc.Attention(dim, heads, num_kv_heads=kv_heads, pe=half, qkv_bias=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for proj, h in ((b.q_proj, heads), (b.k_proj, kv_heads)):
            proj.weight.copy_(hf.permute_qk_weight(proj.weight, h, head_dim, to="half", rotary_dim=rotary_dim))
            proj.bias.copy_(hf.permute_qk_weight(proj.bias, h, head_dim, to="half", rotary_dim=rotary_dim))
        for p in (a.q_proj.weight, a.k_proj.weight):
            p.mul_(10)
        for p in (b.q_proj.weight, b.k_proj.weight):
            p.mul_(10)
    x = torch.randn(2, 11, dim)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    # without the permutation the outputs differ: the layouts really are different
    c = posenc.Attention(dim, heads, num_kv_heads=kv_heads, pe=half, qkv_bias=True)
    c.load_state_dict(a.state_dict())
    assert (c(x) - a(x)).abs().max() > 1e-3
    # round trip
    w = a.q_proj.weight
    back = hf.permute_qk_weight(
        hf.permute_qk_weight(w, heads, head_dim, to="half", rotary_dim=rotary_dim),
        heads,
        head_dim,
        to="interleaved",
        rotary_dim=rotary_dim,
    )
    torch.testing.assert_close(back, w)


def test_permute_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        hf.permute_qk_weight(torch.randn(10, 4), 2, 4)
    with pytest.raises(ValueError, match="to"):
        hf.permute_qk_weight(torch.randn(8, 4), 2, 4, to="gptj")
    with pytest.raises(ValueError, match="rotary_dim"):
        hf.permute_qk_weight(torch.randn(8, 4), 2, 4, rotary_dim=3)
