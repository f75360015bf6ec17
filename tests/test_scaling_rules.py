"""The table of RoPE scaling rules (posenc.functional.rope_scaling.SCALING_RULES): a new rule
is one function and one table entry; rule names and their aliases."""

from __future__ import annotations

import pytest
import torch

import posenc
from posenc.functional.rope_rules import check_factor, check_positive, default_frequencies
from posenc.functional.rope_scaling import SCALING_RULES, ScalingRule, extension_rules, scaling_rule


def test_a_new_rule_is_one_table_entry(monkeypatch):
    """One function and one entry of SCALING_RULES (added here for this test only): the rule
    then works through rope_frequencies and posenc.create("rope", ...), its keys are checked,
    its alias is accepted; nothing else is touched."""

    def power_frequencies(cfg, seq_len=None, device=None):
        inv_freq, _ = default_frequencies(cfg, device=device)
        return inv_freq / cfg.factor ** cfg.param("power"), 1.0

    rule = ScalingRule(
        "power",
        power_frequencies,
        keys={"factor": check_factor, "power": check_positive},
        required=("factor", "power"),
        aliases=("pow",),
    )
    monkeypatch.setitem(SCALING_RULES, "power", rule)

    params = {"rope_type": "power", "factor": 4.0, "power": 0.5, "rope_theta": 100.0}
    inv, af = posenc.rope_frequencies(4, params)  # 4 ** 0.5 = 2: [1, 1/10] / 2
    torch.testing.assert_close(inv, torch.tensor([0.5, 0.05], dtype=torch.float64))
    assert af == 1.0
    pe = posenc.create("rope", head_dim=4, base=100.0, rope_type="pow", factor=4.0, rope_parameters={"power": 0.5})
    assert pe.cfg.rope_type == "power" and not pe.length_dependent
    torch.testing.assert_close(pe.inv_freq, inv)
    linear = posenc.create("rope", head_dim=4, base=100.0, rope_type="linear", factor=2.0)
    q, k, pos = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4), torch.arange(5)
    for got, want in zip(pe.rotate(q, k, pos, pos), linear.rotate(q, k, pos, pos), strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="needs key 'power'"):
        posenc.rope_frequencies(4, {"rope_type": "power", "factor": 2.0})
    with pytest.raises(TypeError, match="power"):
        posenc.rope_frequencies(4, {**params, "power": "half"})
    with pytest.raises(ValueError, match="not used by rope_type 'linear'"):
        posenc.rope_frequencies(4, {"rope_type": "linear", "factor": 2.0, "power": 0.5})
    with pytest.raises(ValueError, match="Did you mean 'power'"):
        posenc.rope_frequencies(4, {"rope_type": "powr", "factor": 2.0})


def test_rule_names_and_aliases():
    assert extension_rules() == ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
    assert scaling_rule("PI").name == scaling_rule("linear").name == "linear"
    assert scaling_rule("none").name == "default"
    with pytest.raises(ValueError, match="unknown rule 'yarm'.*Did you mean 'yarn'"):
        scaling_rule("yarm")
    # rope_frequencies stays strict: aliases are for posenc's own names, not for HF dicts
    with pytest.raises(ValueError, match="'pi' is not supported"):
        posenc.rope_frequencies(8, {"rope_type": "pi", "factor": 2.0})
    a = posenc.create("rope", head_dim=8, rope_type="pi", factor=2.0)
    b = posenc.create("rope", head_dim=8, rope_type="linear", factor=2.0)
    torch.testing.assert_close(a.inv_freq, b.inv_freq)
