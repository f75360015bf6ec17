"""posenc.rope_frequencies: every rope_type against transformers, hand-derived values,
properties (factor 1 = default, linear = default / factor) and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

import posenc
from posenc.functional.rope_scaling import SCALING_RULES, rope_types

ROPE_TYPES = rope_types()  # what rope_frequencies accepts
# every rule of the table with a frequency function of its own
ROPE_FREQUENCY_FUNCTIONS = {name: rule.frequencies for name, rule in SCALING_RULES.items() if rule.frequencies}

transformers.logging.set_verbosity_error()


def hf_frequencies(head_dim, rope_parameters, max_position_embeddings, seq_len=None):
    """transformers' (inv_freq, attention_factor) for the same inputs."""
    cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
    )
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS: each model has it; NeoX honours partial rotary
        return GPTNeoXRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)


def ramp(n, lo=1.0, step=0.25):
    return [lo + step * i for i in range(n)]


# (head_dim, rope_parameters, max_position_embeddings, seq_len)
CASES = [
    (64, {"rope_type": "default", "rope_theta": 10000.0}, 2048, None),
    (128, {"rope_type": "default", "rope_theta": 500000.0}, 8192, 100000),
    (80, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}, 2048, None),
    (64, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 2048, None),
    (128, {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, 4096, 100000),
    (64, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}, 2048, None),
    (64, {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 2048, None),
    (64, {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 2048, 1000),
    (64, {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 2048, 5000),
    (128, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}, 4096, 65536),
    (96, {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}, 512, 4000),
    (64, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 2048}, 8192, None),
    (
        128,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "rope_theta": 1e4,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        163840,
        200000,
    ),
    (
        64,
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "rope_theta": 5e5,
            "original_max_position_embeddings": 8192,
            "truncate": False,
            "attention_factor": 1.5,
        },
        65536,
        None,
    ),
    (
        64,
        {"rope_type": "yarn", "factor": None, "rope_theta": 1e4, "original_max_position_embeddings": 1024},
        4096,
        None,
    ),
    (
        64,
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "rope_theta": 1e4,
            "original_max_position_embeddings": 512,
            "partial_rotary_factor": 0.5,
        },
        1024,
        None,
    ),
    (
        64,
        {
            "rope_type": "longrope",
            "short_factor": ramp(32),
            "long_factor": ramp(32, 2.0, 1.5),
            "rope_theta": 1e4,
            "original_max_position_embeddings": 2048,
            "factor": 8.0,
        },
        16384,
        None,
    ),
    (
        64,
        {
            "rope_type": "longrope",
            "short_factor": ramp(32),
            "long_factor": ramp(32, 2.0, 1.5),
            "rope_theta": 1e4,
            "original_max_position_embeddings": 2048,
            "factor": 8.0,
        },
        16384,
        2048,
    ),
    (
        64,
        {
            "rope_type": "longrope",
            "short_factor": ramp(32),
            "long_factor": ramp(32, 2.0, 1.5),
            "rope_theta": 1e4,
            "original_max_position_embeddings": 2048,
        },
        131072,
        9000,
    ),  # factor derived from the lengths (Phi-3)
    (
        48,
        {
            "rope_type": "longrope",
            "short_factor": ramp(12, 1.0, 0.1),
            "long_factor": ramp(12, 3.0, 0.5),
            "rope_theta": 1e4,
            "original_max_position_embeddings": 256,
            "factor": 4.0,
            "attention_factor": 1.25,
            "partial_rotary_factor": 0.5,
        },
        1024,
        300,
    ),
    (
        128,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "rope_theta": 500000.0,
            "original_max_position_embeddings": 8192,
        },
        131072,
        None,
    ),
    (
        64,
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "rope_theta": 500000.0,
            "original_max_position_embeddings": 8192,
        },
        131072,
        200000,
    ),
    (
        64,
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 16.0,
            "rope_theta": 1e4,
            "original_max_position_embeddings": 512,
        },
        2048,
        None,
    ),
    (64, {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e4}, 2048, None),
    (128, {"rope_type": "proportional", "partial_rotary_factor": 0.75, "rope_theta": 1e6, "factor": 2.0}, 8192, None),
    (64, {"rope_type": "proportional", "rope_theta": 1e4}, 2048, 9000),
]


@pytest.mark.parametrize("head_dim,params,mpe,seq_len", CASES, ids=lambda v: str(v)[:40])
def test_equals_transformers(head_dim, params, mpe, seq_len):
    ref, ref_af = hf_frequencies(head_dim, params, mpe, seq_len)
    inv_freq, af = posenc.rope_frequencies(head_dim, params, max_position_embeddings=mpe, seq_len=seq_len)
    assert inv_freq.dtype == torch.float64
    assert inv_freq.shape == ref.shape
    # transformers computes in float32, posenc in float64: equal to float32 rounding.
    torch.testing.assert_close(inv_freq, ref.double(), rtol=2e-6, atol=0.0)
    assert af == pytest.approx(ref_af, rel=1e-12)


def test_every_rope_type_has_reference_cases():
    assert set(ROPE_TYPES) == set(ROPE_FREQUENCY_FUNCTIONS)
    assert {c[1]["rope_type"] for c in CASES} == set(ROPE_TYPES)
    # several parameter sets each, one with seq_len past the original length for the length-dependent ones
    for t in ROPE_TYPES:
        assert sum(c[1]["rope_type"] == t for c in CASES) >= 3


# -- hand-derived values (head_dim 4, base 100: inv_freq = [1, 1/10]) ----------------------
def test_default_hand():
    inv, af = posenc.rope_frequencies(4, {"rope_theta": 100.0})
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1], dtype=torch.float64))
    assert af == 1.0


def test_linear_hand():
    inv, _ = posenc.rope_frequencies(4, {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0})
    torch.testing.assert_close(inv, torch.tensor([0.5, 0.05], dtype=torch.float64))


def test_dynamic_hand():
    # base' = 100 * (2 * 20 / 10 - 1) ** (4 / 2) = 900 -> [1, 1/30]; unchanged up to length 10
    p = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}
    inv, _ = posenc.rope_frequencies(4, p, max_position_embeddings=10, seq_len=20)
    torch.testing.assert_close(inv, torch.tensor([1.0, 1 / 30], dtype=torch.float64))
    inv, _ = posenc.rope_frequencies(4, p, max_position_embeddings=10, seq_len=7)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1], dtype=torch.float64))


def test_longrope_hand_switches_at_original_length():
    p = {
        "rope_type": "longrope",
        "short_factor": [1.0, 2.0],
        "long_factor": [3.0, 4.0],
        "rope_theta": 100.0,
        "original_max_position_embeddings": 8,
        "factor": 4.0,
    }
    short, af = posenc.rope_frequencies(4, p, seq_len=8)
    long, af2 = posenc.rope_frequencies(4, p, seq_len=9)
    torch.testing.assert_close(short, torch.tensor([1.0, 0.05], dtype=torch.float64))
    torch.testing.assert_close(long, torch.tensor([1 / 3, 0.025], dtype=torch.float64))
    assert af == af2 == pytest.approx(math.sqrt(1 + math.log(4) / math.log(8)))


def test_llama3_hand():
    # wavelengths 2pi (< 100/4: kept) and 20pi (between 25 and 100: blended)
    p = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "rope_theta": 100.0,
        "original_max_position_embeddings": 100,
    }
    inv, _ = posenc.rope_frequencies(4, p)
    s = (100 / (20 * math.pi) - 1) / (4 - 1)
    expected = torch.tensor([1.0, (1 - s) * 0.1 / 8 + s * 0.1], dtype=torch.float64)
    torch.testing.assert_close(inv, expected)


def test_proportional_hand():
    # head_dim 8, p = 0.5: int(0.5 * 8 // 2) = 2 rotated pairs with exponent 2i/8, 2 zero pairs
    inv, _ = posenc.rope_frequencies(8, {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4})
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1, 0.0, 0.0], dtype=torch.float64))


def test_yarn_attention_factor_hand():
    base = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert posenc.rope_frequencies(16, base)[1] == pytest.approx(0.1 * math.log(4) + 1)
    ds = {**base, "mscale": 0.707, "mscale_all_dim": 1.0}
    expected = (0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1)
    assert posenc.rope_frequencies(16, ds)[1] == pytest.approx(expected)


def test_yarn_ramp_ends():
    # fast pairs (many rotations in the original context) are untouched, slow ones divided by factor
    p = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 1e4}
    inv, _ = posenc.rope_frequencies(64, p)
    ref, _ = posenc.rope_frequencies(64, {"rope_theta": 1e4})
    torch.testing.assert_close(inv[:4], ref[:4])
    torch.testing.assert_close(inv[-4:], ref[-4:] / 4)


# -- properties --------------------------------------------------------------------------
ONE = [
    {"rope_type": "linear", "factor": 1.0},
    {"rope_type": "dynamic", "factor": 1.0},
    {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512},
    {
        "rope_type": "llama3",
        "factor": 1.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    {
        "rope_type": "longrope",
        "short_factor": [1.0] * 16,
        "long_factor": [1.0] * 16,
        "original_max_position_embeddings": 512,
        "factor": 1.0,
    },
    {"rope_type": "proportional", "factor": 1.0, "partial_rotary_factor": 1.0},
]


# dynamic NTK scales past max_position_embeddings even at factor 1: see the next test
FACTOR_ONE = [(p, n) for p in ONE for n in (None, 100, 5000) if not (p["rope_type"] == "dynamic" and n == 5000)]


@pytest.mark.parametrize("params,seq_len", FACTOR_ONE, ids=lambda v: str(v)[:30])
def test_factor_one_equals_default(params, seq_len):
    params = {**params, "rope_theta": 5e5}
    inv, af = posenc.rope_frequencies(32, params, max_position_embeddings=512, seq_len=seq_len)
    ref, _ = posenc.rope_frequencies(32, {"rope_theta": 5e5})
    torch.testing.assert_close(inv, ref, rtol=1e-13, atol=0)
    assert af == 1.0


def test_dynamic_factor_one_past_length_is_ntk_by_length_ratio():
    # (1 * L / M - 0) ** (r / (r - 2)): the base grows by (L / M) ** (r / (r - 2)) even at factor 1
    inv, _ = posenc.rope_frequencies(
        32, {"rope_type": "dynamic", "factor": 1.0}, max_position_embeddings=512, seq_len=2048
    )
    ref, _ = posenc.rope_frequencies(32, {"rope_theta": 1e4 * 4.0 ** (32 / 30)})
    torch.testing.assert_close(inv, ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("factor", [1.5, 2.0, 16.0])
def test_linear_is_default_over_factor(factor):
    inv, _ = posenc.rope_frequencies(64, {"rope_type": "linear", "factor": factor})
    ref, _ = posenc.rope_frequencies(64, {})
    torch.testing.assert_close(inv, ref / factor, rtol=1e-14, atol=0)


def test_scaled_rules_lower_frequencies():
    ref, _ = posenc.rope_frequencies(64, {}, max_position_embeddings=2048)
    for params in CASES:
        head_dim, p, mpe, seq_len = params
        if head_dim != 64 or p.get("rope_theta", 1e4) != 1e4 or "partial_rotary_factor" in p:
            continue
        inv, _ = posenc.rope_frequencies(head_dim, p, max_position_embeddings=mpe, seq_len=seq_len)
        assert (inv <= ref * (1 + 1e-12)).all(), p["rope_type"]


# -- bad input ---------------------------------------------------------------------------
BAD = [
    ({"rope_type": "linear", "factor": 2.0, "fator": 1.0}, ValueError, "fator"),
    ({"rope_type": "ntk"}, ValueError, "ntk"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, ValueError, "beta_fast"),
    ({"rope_type": "linear"}, ValueError, "factor"),
    ({"rope_type": "linear", "factor": 0.5}, ValueError, "factor"),
    ({"rope_type": "linear", "factor": "2"}, TypeError, "factor"),
    ({"rope_type": "linear", "factor": True}, TypeError, "factor"),
    ({"rope_type": "yarn", "factor": 4.0}, ValueError, "original_max_position_embeddings"),
    (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        ValueError,
        "original_max_position_embeddings",
    ),
    (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 4.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        ValueError,
        "high_freq_factor",
    ),
    (
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 3,
            "long_factor": [1.0] * 4,
            "original_max_position_embeddings": 64,
            "factor": 2.0,
        },
        ValueError,
        "short_factor",
    ),
    (
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 4,
            "long_factor": "abcd",
            "original_max_position_embeddings": 64,
            "factor": 2.0,
        },
        TypeError,
        "long_factor",
    ),
    (
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 4,
            "long_factor": [1.0, 2.0, -1.0, 1.0],
            "original_max_position_embeddings": 64,
            "factor": 2.0,
        },
        ValueError,
        "long_factor",
    ),
    (
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "truncate": 1},
        TypeError,
        "truncate",
    ),
    (
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 1, "beta_slow": 4},
        ValueError,
        "beta_fast",
    ),
    (
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64.5},
        TypeError,
        "original_max_position_embeddings",
    ),
    (
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": -1.0},
        ValueError,
        "attention_factor",
    ),
    ({"rope_theta": 1.0}, ValueError, "rope_theta"),
    ({"rope_theta": float("nan")}, ValueError, "rope_theta"),
    ({"partial_rotary_factor": 0.4}, ValueError, "partial_rotary_factor"),
    ({"partial_rotary_factor": 1.5}, ValueError, "partial_rotary_factor"),
    ({"rope_type": 3}, TypeError, "rope_type"),
    ({"rope_type": "linear", "type": "yarn", "factor": 2.0}, ValueError, "type"),
    ({"rope_type": "default", "mrope_section": [2, 2]}, ValueError, "mrope_section"),
]


@pytest.mark.parametrize("params,exc,word", BAD, ids=lambda v: str(v)[:50])
def test_bad_parameters(params, exc, word):
    with pytest.raises(exc, match=word):
        posenc.rope_frequencies(8, params, max_position_embeddings=128)


def test_bad_arguments():
    with pytest.raises(TypeError, match="rope_parameters"):
        posenc.rope_frequencies(8, [("rope_type", "linear")])
    with pytest.raises(ValueError, match="head_dim"):
        posenc.rope_frequencies(0, {})
    with pytest.raises(TypeError, match="head_dim"):
        posenc.rope_frequencies(8.0, {})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        posenc.rope_frequencies(8, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        posenc.rope_frequencies(8, {"rope_type": "yarn", "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="seq_len"):
        posenc.rope_frequencies(8, {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=4, seq_len=0)
    with pytest.raises(ValueError, match="rotary dimension"):
        posenc.rope_frequencies(2, {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=4)


def test_legacy_type_key_and_none_values():
    a, _ = posenc.rope_frequencies(16, {"type": "linear", "factor": 2.0, "attention_factor": None})
    b, _ = posenc.rope_frequencies(16, {"rope_type": "linear", "factor": 2.0})
    torch.testing.assert_close(a, b)
