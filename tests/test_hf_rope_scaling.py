"""posenc.interop.hf takes every rope config transformers runs: transformers' own
rope-scaling model tests (``CausalLMModelTest.test_model_rope_scaling_from_config`` and
``test_model_rope_scaling_frequencies``, Phi-3's short/long factor switch) reproduced
through the bridge on tiny Llama, Qwen2 and Phi-3 models built with ``from_config``:
patched logits equal transformers' unpatched logits at lengths below and above the
original max position, including the configs transformers accepts with a logged warning
(the bridge warns with a ``RopeParameterWarning``); ``posenc.rope_frequencies`` stays
strict on the same dicts."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import posenc
from posenc.encodings.rotary import RoPE
from posenc.functional.rope_scaling import parse_rope_parameters
from posenc.interop import hf

transformers.logging.set_verbosity_error()

VOCAB = 100
MPE = 16  # max_position_embeddings: dynamic's threshold
ORIG = 8  # original_max_position_embeddings of the longrope/llama3 settings: longrope's threshold
SHORT, LONG = 6, 40  # below every threshold (6 < 8 < 16 < 32), above every one
N_FREQ = 4  # head_dim 8


def ramp(lo, step):
    return [lo + step * i for i in range(N_FREQ)]


# name -> (rope_parameters, top-level config kwargs, RopeParameterWarning message parts the bridge must give)
SETTINGS = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, {}, ()),
    # transformers' common test: 'original_max_position_embeddings' left in a default dict (ignored, logged) ...
    "default+orig": (
        {"rope_type": "default", "rope_theta": 10000.0, "original_max_position_embeddings": 16384},
        {},
        ("original_max_position_embeddings", "not used by rope_type 'default'"),
    ),
    # ... and kept by dict.update when the test switches to linear / dynamic / yarn
    "linear+orig": (
        {"rope_type": "linear", "factor": 10.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16384},
        {},
        ("original_max_position_embeddings", "not used by rope_type 'linear'"),
    ),
    "dynamic+orig": (
        {"rope_type": "dynamic", "factor": 10.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16384},
        {},
        ("original_max_position_embeddings", "not used by rope_type 'dynamic'"),
    ),
    "linear": ({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, {}, ()),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, {}, ()),
    # transformers logs that factor 10 is not 16 / 16384 and uses 10
    "yarn+orig": (
        {"rope_type": "yarn", "factor": 10.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16384},
        {"original_max_position_embeddings": 16384},
        ("using the explicit factor",),
    ),
    # yarn without original_max_position_embeddings: transformers fills in max_position_embeddings
    # (Phi-3 reads its top-level original_max_position_embeddings, default 4096, first)
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
        {"original_max_position_embeddings": MPE},
        (),
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": ORIG,
            "factor": 4.0,
            "short_factor": ramp(1.0, 0.3),
            "long_factor": ramp(2.0, 2.5),
        },
        {"original_max_position_embeddings": ORIG},  # Phi-3 reads its top-level value first
        (),
    ),
    # Phi-3 style: no factor, max_position_embeddings (16) below original_max_position_embeddings (32):
    # derived factor 0.5, attention factor 1 (transformers' Phi-3 tester: 512 vs Phi3Config's 4096)
    "longrope-factor<1": (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
            "short_factor": ramp(1.0, 0.3),
            "long_factor": ramp(2.0, 2.5),
        },
        {"original_max_position_embeddings": 32},
        ("derived factor", "16 / 32 is < 1"),
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "rope_theta": 500.0,
            "original_max_position_embeddings": ORIG,
        },
        {"original_max_position_embeddings": ORIG},
        (),
    ),
    # more that transformers logs and computes anyway
    "linear-factor<1": (
        {"rope_type": "linear", "factor": 0.5, "rope_theta": 10000.0},
        {},
        ("'factor'", "must be >= 1"),
    ),
    "yarn-beta-swapped": (
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "beta_fast": 1.0, "beta_slow": 4.0},
        {"original_max_position_embeddings": MPE},
        ("beta_fast",),
    ),
    "llama3-high<=low": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 4.0,
            "high_freq_factor": 2.0,
            "rope_theta": 500.0,
            "original_max_position_embeddings": ORIG,
        },
        {"original_max_position_embeddings": ORIG},
        ("high_freq_factor",),
    ),
}

#: Phi-3's config accepts only default and longrope in its constructor; transformers' own
#: scaling tests set the others on the built config (``_set_config_rope_params``): done here too.
PHI3_CONSTRUCTOR = {"default", "default+orig", "longrope", "longrope-factor<1"}


def make_config(model: str, setting: str):
    params, top, _ = SETTINGS[setting]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MPE,
    )
    if model == "llama":
        return transformers.LlamaConfig(**common, rope_parameters=dict(params))
    if model == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=dict(params))
    phi3 = dict(common, pad_token_id=0, bos_token_id=1, eos_token_id=2, **top)
    if setting in PHI3_CONSTRUCTOR:
        return transformers.Phi3Config(**phi3, rope_parameters=dict(params))
    config = transformers.Phi3Config(**phi3)
    config.rope_parameters.update(params)  # as transformers' _set_config_rope_params
    return config


def make_model(model: str, setting: str, seed: int = 0):
    torch.manual_seed(seed)
    lm = transformers.AutoModelForCausalLM.from_config(make_config(model, setting)).eval()
    with torch.no_grad():  # large q/k weights: the rotation dominates the logits
        for name, p in lm.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "qkv_proj")):
                p.mul_(10)
    return lm


def tokens(length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))


def patch_expecting(lm, setting: str) -> list[str]:
    """patch_rope, asserting the RopeParameterWarning the setting calls for (and no other)."""
    expected = SETTINGS[setting][2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = hf.patch_rope(lm)
    ours = [str(w.message) for w in caught if issubclass(w.category, hf.RopeParameterWarning)]
    if expected:
        assert len(ours) == 1, ours
        for part in expected:
            assert part in ours[0], (part, ours[0])
        assert "transformers" in ours[0]
    else:
        assert ours == []
    return names


CASES = [(m, s) for m in ("llama", "qwen2", "phi3") for s in SETTINGS]


@pytest.mark.parametrize("model,setting", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_patched_logits_equal_transformers(model, setting):
    lm = make_model(model, setting)
    short, long = tokens(SHORT), tokens(LONG)
    with torch.no_grad():
        ref = [lm(short).logits, lm(long).logits, lm(short).logits]  # short again: dynamic resets
        names = patch_expecting(lm, setting)
        out = [lm(short).logits, lm(long).logits, lm(short).logits]
    assert names and all(isinstance(lm.get_submodule(n), hf.PosencRotaryEmbedding) for n in names)
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("scaling", ["linear+orig", "dynamic+orig", "yarn+orig"])
def test_rope_scaling_from_config_properties(model, scaling):
    """transformers' test_model_rope_scaling_from_config, on patched models: dynamic equals
    the unscaled model on a short input, every rule differs from it on a long one."""
    short, long = tokens(10), tokens(int(MPE * 1.5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.RopeParameterWarning)
        original = make_model(model, "default+orig", seed=42)
        hf.patch_rope(original)
        scaled = make_model(model, scaling, seed=42)
        hf.patch_rope(scaled)
        o_short, o_long = original(short).logits, original(long).logits
        s_short, s_long = scaled(short).logits, scaled(long).logits
    if scaling.startswith("dynamic"):
        torch.testing.assert_close(s_short, o_short, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(s_short, o_short, atol=1e-5)
    assert not torch.allclose(s_long, o_long, atol=1e-5)


def test_rope_scaling_frequencies_properties():
    """transformers' test_model_rope_scaling_frequencies, on PosencRotaryEmbedding: linear
    position x is unscaled position x / factor, dynamic changes only past the threshold and
    lowers the frequencies, yarn scales every length."""
    factor, short_n, long_n = 10, 10, int(MPE * 1.5)
    x = torch.zeros(1)
    pos_short, pos_long = torch.arange(short_n)[None], torch.arange(long_n)[None]

    def rotary(setting):
        params = {**SETTINGS[setting][0], "factor": float(factor)} if setting != "default" else SETTINGS[setting][0]
        cfg = transformers.LlamaConfig(
            hidden_size=32, num_attention_heads=4, max_position_embeddings=MPE, rope_parameters=dict(params)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf.RopeParameterWarning)
            return hf.PosencRotaryEmbedding(hf.rope_from_config(cfg))

    original, linear, ntk, yarn = (rotary(s) for s in ("default", "linear+orig", "dynamic+orig", "yarn"))
    o_short, o_long = original(x, pos_short)[0], original(x, pos_long)[0]
    torch.testing.assert_close(o_short, o_long[:, :short_n])
    l_long = linear(x, pos_long)[0]
    for new in range(0, long_n, factor):
        torch.testing.assert_close(l_long[:, new], o_long[:, new // factor])
    torch.testing.assert_close(ntk(x, pos_short)[0], o_short)
    assert not torch.allclose(ntk(x, pos_long)[0], o_long)
    assert (ntk.pe.frequencies_for_length(long_n)[1] <= original.pe.inv_freq).all()
    y_short, y_long = yarn(x, pos_short)[0], yarn(x, pos_long)[0]
    torch.testing.assert_close(y_short, y_long[:, :short_n])
    assert not torch.allclose(y_short, o_short) and not torch.allclose(y_long, o_long)


@pytest.mark.parametrize("setting", ["longrope", "longrope-factor<1"])
def test_phi3_short_long_factor_switch_in_generation(setting):
    """Phi-3's short/long factor test through the bridge: greedy decoding that crosses
    original_max_position_embeddings (short factors, then long ones) gives the same scores
    patched and unpatched; the switch is real (the scores differ without it)."""
    lm = make_model("phi3", setting)
    orig = SETTINGS[setting][1]["original_max_position_embeddings"]
    prompt = tokens(orig - 3)[:1]
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = lm.generate(prompt, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf.RopeParameterWarning)
            hf.patch_rope(lm)
        out = lm.generate(prompt, **kwargs)
    assert ref.sequences.shape[-1] > orig + 1  # crossed the switch
    torch.testing.assert_close(out.sequences, ref.sequences, rtol=0, atol=0)
    for got, want in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pe = lm.model.rotary_emb.pe
    short_set, long_set = pe.frequencies_for_length(orig)[1], pe.frequencies_for_length(orig + 1)[1]
    assert not torch.allclose(short_set, long_set)


# -- frequencies at a length, seq_len = 0 included -----------------------------------------------
FREQ_CASES = [(m, s) for m in ("llama", "phi3") for s in SETTINGS if s != "default"]


@pytest.mark.parametrize("model,setting", FREQ_CASES, ids=[f"{m}-{s}" for m, s in FREQ_CASES])
def test_frequencies_from_config_equal_rope_init_functions(model, setting):
    config = make_config(model, setting)
    rope_type = config.rope_parameters["rope_type"]
    threshold = config.rope_parameters.get("original_max_position_embeddings", MPE)
    for seq_len in (None, 0, 1, SHORT, threshold, threshold + 1, MPE, MPE + 1, 1000):
        if rope_type == "default":
            ref, ref_af = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            ref, ref_af = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf.RopeParameterWarning)
            inv_freq, af = hf.frequencies_from_config(config, seq_len=seq_len)
        torch.testing.assert_close(inv_freq, ref.double(), rtol=2e-6, atol=0), (setting, seq_len)
        assert af == pytest.approx(ref_af, rel=1e-12), (setting, seq_len)


def test_seq_len_zero_is_no_length_for_longrope_and_dynamic():
    # transformers: longrope `if seq_len and seq_len > original` (0: short factors);
    # dynamic `max(seq_len, max_position_embeddings)` (0: the unscaled base)
    for setting in ("longrope", "dynamic"):
        config = make_config("llama", setting)
        zero = hf.frequencies_from_config(config, seq_len=0)
        none = hf.frequencies_from_config(config)
        torch.testing.assert_close(zero[0], none[0], rtol=0, atol=0)
        assert zero[1] == none[1]
    with pytest.raises(ValueError, match="seq_len"):
        hf.frequencies_from_config(make_config("llama", "longrope"), seq_len=-1)
    # posenc.rope_frequencies keeps refusing it
    with pytest.raises(ValueError, match="seq_len"):
        posenc.rope_frequencies(8, SETTINGS["longrope"][0], max_position_embeddings=MPE, seq_len=0)


# -- the lenient parse, and rope_frequencies staying strict ---------------------------------------
LENIENT = [s for s, (_, _, expected) in SETTINGS.items() if expected]
WARN_ONLY = {"yarn+orig"}  # posenc accepts it too (a mismatch, not an error): only the bridge warns


def standardized(setting: str) -> dict:
    """The setting's dict as transformers standardizes it (yarn/longrope/llama3 get
    original_max_position_embeddings = max_position_embeddings when absent)."""
    params = dict(SETTINGS[setting][0])
    if params["rope_type"] in ("yarn", "longrope", "llama3"):
        params.setdefault("original_max_position_embeddings", MPE)
    return params


@pytest.mark.parametrize("setting", [s for s in LENIENT if s not in WARN_ONLY])
def test_rope_frequencies_stays_strict(setting):
    params, expected = standardized(setting), SETTINGS[setting][2]
    with pytest.raises(ValueError) as err:
        posenc.rope_frequencies(8, params, max_position_embeddings=MPE)
    assert all(part in str(err.value) for part in expected if part != "'factor'"), str(err.value)
    with pytest.raises(ValueError):
        posenc.create("rope", head_dim=8, max_len=MPE, rope_parameters=params)


@pytest.mark.parametrize("setting", LENIENT)
def test_lenient_parse_warns_once_naming_the_problem(setting):
    params, expected = standardized(setting), SETTINGS[setting][2]
    with pytest.warns(hf.RopeParameterWarning) as record:
        cfg = parse_rope_parameters(8, params, max_position_embeddings=MPE, lenient=True)
    assert len(record) == 1
    assert all(part in str(record[0].message) for part in expected)
    assert cfg.rope_type == params["rope_type"]
    if cfg.rope_type in ("default", "linear", "dynamic"):
        assert "original_max_position_embeddings" not in dict(cfg.parameters)


def test_lenient_parse_drops_unknown_keys_and_prefers_rope_type():
    with pytest.warns(hf.RopeParameterWarning, match="mrope_section"):
        cfg = parse_rope_parameters(8, {"rope_type": "linear", "factor": 2.0, "mrope_section": [1, 1]}, lenient=True)
    assert dict(cfg.parameters) == {"factor": 2.0}
    with pytest.warns(hf.RopeParameterWarning, match="using rope_type"):
        cfg = parse_rope_parameters(8, {"rope_type": "linear", "type": "yarn", "factor": 2.0}, lenient=True)
    assert cfg.rope_type == "linear"


LENIENT_STILL_REFUSES = [
    ({"rope_type": "su", "factor": 2.0}, ValueError, "su"),  # transformers: no init function
    ({"rope_type": "linear"}, ValueError, "factor"),  # transformers: KeyError (missing required key)
    ({"rope_type": "linear", "factor": 0.0}, ValueError, "factor"),  # infinite frequencies
    ({"rope_type": "linear", "factor": "2"}, TypeError, "factor"),
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
    ),  # transformers: a broadcast error in the init function (Phi-3: a ValueError)
]


@pytest.mark.parametrize("params,exc,word", LENIENT_STILL_REFUSES, ids=lambda v: str(v)[:40])
def test_lenient_parse_still_refuses_what_transformers_cannot_run(params, exc, word):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.RopeParameterWarning)
        with pytest.raises(exc, match=word):
            parse_rope_parameters(8, params, max_position_embeddings=128, lenient=True)


def test_rope_from_config_is_a_rope_and_warns_once():
    config = make_config("llama", "linear+orig")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pe = hf.rope_from_config(config)
    assert isinstance(pe, RoPE)
    assert sum(issubclass(w.category, hf.RopeParameterWarning) for w in caught) == 1
    assert pe.cfg.factor == 10.0
    with pytest.raises(ValueError, match="not used by rope_type 'linear'"):
        posenc.create("rope", head_dim=8, max_len=MPE, rope_parameters=config.rope_parameters)
