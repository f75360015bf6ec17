"""posenc extend: rule swaps give exactly rope_frequencies' frequencies, the fine-tune
hook starts from the base weights, the command writes its outputs, bad input is one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import posenc
from posenc.cli import app
from posenc.experiments.config import config_from_dict
from posenc.experiments.extend import (
    RULES,
    Finetune,
    check_rules,
    finetune_config,
    rule_parameters,
    swap_rule,
    trained_context,
    validate_extension,
)
from posenc.experiments.extend_summary import ordering_tables, orderings
from posenc.experiments.train import build_model, checkpoint_path, load_checkpoint, setup, train_run
from posenc.pipeline.extension import extension_report_section

TINY = {
    "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 4},
    "model": {"encoding": "rope", "dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup": 1},
}


def _model():
    cfg = config_from_dict(TINY)
    s = setup(cfg)
    torch.manual_seed(0)
    return cfg, build_model(cfg, s.vocab_size, s.max_len)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("factor", [2, 4])
def test_swapped_encoding_has_rope_frequencies_of_the_rule(rule, factor):
    cfg, model = _model()
    C = trained_context(cfg)  # copy, n = 3: BOS + 3 + SEP + 3 = 8 tokens, 7 input positions
    assert C == 7
    new_cfg, swapped = swap_rule(model, cfg, rule, factor)
    params = rule_parameters(rule, factor, C, rotary_dim=8)
    assert new_cfg.model.encoding_params == {"rope_parameters": params, "max_len": C}
    assert all(b.attn.pe is swapped.pe for b in swapped.blocks)  # one shared encoding
    for name, t in model.state_dict().items():  # same weights
        assert torch.equal(swapped.state_dict()[name], t)
    for n in (C, factor * C, 8 * C):
        _, inv_freq, af = swapped.pe.frequencies_for_length(n)
        ref, ref_af = posenc.rope_frequencies(8, params, max_position_embeddings=C, seq_len=n)
        torch.testing.assert_close(inv_freq, ref.to(inv_freq.dtype), rtol=1e-12, atol=0)
        assert af == pytest.approx(ref_af, rel=1e-12)


def test_rule_frequencies_by_hand():
    """head_dim 8 (r = 8, pairs i = 0..3), theta 1e4, s = 4, C = 7: the paper formulas."""
    s, C, r = 4, 7, 8
    default = torch.tensor([1e4 ** (-2 * i / r) for i in range(4)], dtype=torch.float64)

    def freqs(rule, n):
        return posenc.rope_frequencies(
            8, rule_parameters(rule, s, C, rotary_dim=r), max_position_embeddings=C, seq_len=n
        )

    torch.testing.assert_close(freqs("none", 100)[0], default)
    torch.testing.assert_close(freqs("linear", 100)[0], default / 4)  # Chen et al. 2023
    ntk_theta = 1e4 * 4 ** (8 / 6)  # bloc97: theta * s^(r/(r-2))
    ntk = torch.tensor([ntk_theta ** (-2 * i / r) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(freqs("ntk", 100)[0], ntk)
    # static NTK = Hugging Face dynamic with factor 1 at length s * C
    dyn1 = posenc.rope_frequencies(
        8, {"rope_type": "dynamic", "factor": 1.0}, max_position_embeddings=C, seq_len=s * C
    )[0]
    torch.testing.assert_close(freqs("ntk", 100)[0], dyn1)
    # dynamic (factor s): unchanged up to C; at n = 2C the base is theta (s n / C - s + 1)^(r/(r-2)) = theta 5^(4/3)
    torch.testing.assert_close(freqs("dynamic", C)[0], default)
    dyn = torch.tensor([(1e4 * 5 ** (8 / 6)) ** (-2 * i / r) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(freqs("dynamic", 2 * C)[0], dyn)
    # YaRN's attention temperature: sqrt(1/t) = 0.1 ln s + 1 multiplies cos and sin
    assert freqs("yarn", 100)[1] == pytest.approx(0.1 * math.log(4) + 1)
    # Llama 3 (low 1, high 4, C = 7): wavelength 2 pi / f > 7 -> f / 4; < 7 / 4 kept; pair 0 (2 pi) blends
    ll = freqs("llama3", 100)[0]
    torch.testing.assert_close(ll[1:], default[1:] / 4)
    smooth = (C / (2 * math.pi) - 1) / (4 - 1)
    assert float(ll[0]) == pytest.approx((1 - smooth) * 1.0 / 4 + smooth * 1.0)


def test_swap_changes_outputs_only_past_the_rule():
    cfg, model = _model()
    for p in model.parameters():  # non-trivial attention
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    ref = model(x)
    torch.testing.assert_close(swap_rule(model, cfg, "none", 4)[1](x), ref, rtol=0, atol=0)
    torch.testing.assert_close(swap_rule(model, cfg, "linear", 1)[1](x), ref, rtol=1e-6, atol=1e-6)
    assert (swap_rule(model, cfg, "linear", 4)[1](x) - ref).abs().max() > 1e-3
    dyn = swap_rule(model, cfg, "dynamic", 4)[1]
    short = x[:, :7]  # length <= C = 7: dynamic NTK is plain RoPE
    torch.testing.assert_close(dyn(short), model(short), rtol=1e-6, atol=1e-6)


def test_finetune_starts_from_the_base_weights(tmp_path):
    cfg = config_from_dict(TINY)
    train_run(cfg, tmp_path / "base")
    ckpt = checkpoint_path(tmp_path / "base", cfg.run_id)
    ft = finetune_config(cfg, "yarn", Finetune(factor=2, steps=1, lr=1e-12, warmup=0), ckpt)
    assert ft.task.train_length == 6 and ft.train.batch_size == 2 and ft.train.init_from == str(ckpt)
    assert ft.model.encoding_params["rope_parameters"]["rope_type"] == "yarn"
    train_run(ft, tmp_path / "ft")
    base = load_checkpoint(ckpt)["model"]
    tuned = load_checkpoint(checkpoint_path(tmp_path / "ft", ft.run_id))["model"]
    for name, t in base.items():  # lr 1e-12: one step moves nothing measurable
        torch.testing.assert_close(tuned[name], t, rtol=0, atol=1e-8)
    assert ft.run_id != config_from_dict({**ft.to_dict(), "train": {**ft.to_dict()["train"], "init_from": None}}).run_id


def _cli(args):
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.mark.slow
def test_cli_extend_tiny_writes_outputs(tmp_path):
    out = tmp_path / "ext"
    args = [
        "extend",
        "--preset",
        "smoke",
        "--tasks",
        "copy",
        "--rules",
        "none,linear,yarn",
        "--factors",
        "2",
        "--finetune-steps",
        "2",
        "--baselines",
        "alibi",
        "--out",
        str(out),
    ]
    code, text = _cli(args)
    assert code == 0, text
    assert str(out / "extension.json") in text.replace("\n", "")
    data = validate_extension(json.loads((out / "extension.json").read_text()))
    assert data["rules"] == ["none", "linear", "yarn"] and data["factors"] == [2]
    assert data["baselines"] == ["alibi"] and data["finetune"]["factor"] == 2
    stages = [(r["rule"], r["stage"]) for r in data["records"]]
    assert stages == [
        ("none", "zero-shot"),
        ("linear", "zero-shot"),
        ("yarn", "zero-shot"),
        ("none", "fine-tuned"),
        ("linear", "fine-tuned"),
        ("yarn", "fine-tuned"),
        ("alibi", "baseline"),
    ]
    for r in data["records"]:
        assert [m["length"] for m in r["metrics"]] == [3, 6]
        expected = {"zero-shot": [1, 2], "fine-tuned": [2, 2], "baseline": [None, None]}[r["stage"]]
        assert [m["factor"] for m in r["metrics"]] == expected
        assert all(0.0 <= m["token_accuracy"] <= 1.0 for m in r["metrics"])
    # at L every rule is plain RoPE (factor 1), so the zero-shot scores agree there
    at_L = {r["metrics"][0]["token_accuracy"] for r in data["records"] if r["stage"] == "zero-shot"}
    assert len(at_L) == 1
    md = (out / "extension.md").read_text()
    assert "copy: per-token accuracy" in md and "published orderings" in md
    assert (out / "plots" / "extension_copy.png").stat().st_size > 1000
    # the HTML report's section (posenc.pipeline.report.write_report(extra_sections=[...]))
    sec = extension_report_section(out / "extension.json")
    assert set(sec) == {"title", "text", "tables", "figures"} and "posenc extend" in sec["text"]
    assert sec["tables"][0]["columns"] == ["rule / stage", "3 (1L)", "6 (2L)"] and len(sec["tables"][0]["rows"]) == 7
    assert [cap for cap, _ in sec["figures"]] == ["copy: each rule against evaluation length"]
    with pytest.raises(ValueError, match="does not exist"):
        extension_report_section(tmp_path / "nope.json")
    html_path = tmp_path / "report.html"
    report_args = ["report", "-o", str(html_path), "--encodings", "rope", "--attention-steps", "0"]
    code, output = _cli([*report_args, "--no-pretrained", "--extension", str(out / "extension.json")])
    assert code == 0, output
    html = html_path.read_text()
    assert "copy: each rule against evaluation length" in html and html.count("data:image/png;base64") >= 1
    # running again reuses every finished run (nothing retrained) and gives the same numbers
    code, _ = _cli(args)
    assert code == 0
    assert json.loads((out / "extension.json").read_text())["records"] == data["records"]


def test_cli_bad_input_is_one_line(tmp_path):
    sin_cfg = config_from_dict({**TINY, "model": {**TINY["model"], "encoding": "sinusoidal"}})
    train_run(sin_cfg, tmp_path / "s")
    not_rope = checkpoint_path(tmp_path / "s", sin_cfg.run_id)
    out = str(tmp_path / "o")
    cases = [
        (["extend", "--rules", "none,ntk2", "--out", out], "unknown rule 'ntk2'"),
        (["extend", "--factors", "2,0", "--out", out], "factor must be >= 1"),
        (["extend", "--finetune-factor", "0", "--out", out], "finetune_factor must be >= 1"),
        (["extend", "--checkpoint", str(tmp_path / "missing.pt"), "--out", out], "does not exist"),
        (["extend", "--checkpoint", str(not_rope), "--out", out], "extend needs a rope model"),
        (["extend", "--preset", "huge", "--out", out], "unknown preset 'huge'"),
        (["extend", "--baselines", "rope", "--out", out], "must be a non-RoPE encoding"),
    ]
    for args, msg in cases:
        code, text = _cli(args)
        assert code == 2, text
        assert msg in text and "Traceback" not in text, text
        assert len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "o").exists()  # nothing trained before the check
    with pytest.raises(ValueError, match="factor must be >= 1"):
        rule_parameters("linear", 0, 8, rotary_dim=8)
    with pytest.raises(ValueError, match="unknown rule 'lineer'.*Did you mean 'linear'"):
        rule_parameters("lineer", 2, 8, rotary_dim=8)
    # the table's aliases name the same rule: PI is linear, NTK-aware is ntk
    assert rule_parameters("PI", 2, 8, rotary_dim=8) == rule_parameters("linear", 2, 8, rotary_dim=8)
    assert rule_parameters("ntk-aware", 2, 8, rotary_dim=8) == rule_parameters("ntk", 2, 8, rotary_dim=8)
    assert check_rules(["pi", "dynamic_ntk", "none"]) == ("linear", "dynamic", "none")


def _ordering_record(rule, stage, seed, at_l, at_2l):
    """An extension record of task "t" at L = 10: perplexity ``at_l`` at L, ``at_2l`` at 2L."""
    return {
        "task": "t",
        "seed": seed,
        "rule": rule,
        "stage": stage,
        "train_length": 10,
        "context": 10,
        "finetune_length": 20 if stage == "fine-tuned" else None,
        "metrics": [
            {"length": 10, "factor": 1, "ppl": at_l, "ppl_sliding": at_l},
            {"length": 20, "factor": 2, "ppl": at_2l, "ppl_sliding": at_2l},
        ],
    }


def test_orderings_by_hand():
    """Two seeds, L = 10, one longer length 20; perplexities chosen by hand."""

    records = []
    for seed, (none2, lin2, ntk2, linft, yarnft) in enumerate([(40, 8, 6, 5.5, 5.0), (40, 8, 9, 30.0, 31.0)]):
        records += [
            _ordering_record("none", "zero-shot", seed, 5.0, none2),
            _ordering_record("linear", "zero-shot", seed, 5.0, lin2),
            _ordering_record("ntk", "zero-shot", seed, 5.0, ntk2),
            _ordering_record("linear", "fine-tuned", seed, 5.0, linft),
            _ordering_record("yarn", "fine-tuned", seed, 5.0, yarnft),
        ]
    got = {c["claim"][:2]: c for c in orderings({"records": records}, "t")}
    assert (got["1."]["holds"], got["1."]["seeds"]) == (2, 2)
    assert got["2."]["holds"] == 2 and got["2."]["a"] == 8 and got["2."]["b"] == 40
    assert got["3."]["holds"] == 1 and got["3."]["a"] == 7.5
    # recovery = (none(20) - linear_ft(20)) / (none(20) - base(10)): (40-5.5)/35, (40-30)/35
    assert got["4."]["recovery"] == pytest.approx([34.5 / 35, 10 / 35])
    assert got["4."]["holds"] == 1
    assert got["5."]["holds"] == 1  # 5.0 < 5.5 yes, 31 < 30 no
    assert [got[k]["ties"] for k in ("1.", "2.", "3.", "5.")] == [0, 0, 0, 0]


def test_a_tie_is_not_agreement():
    """Direct extrapolation that does not fail (the same metric at 2L as at L) and YaRN
    equal to PI are ties: counted apart, never as the claim holding."""

    records = [
        _ordering_record("none", "zero-shot", 0, 5.0, 5.0),
        _ordering_record("linear", "fine-tuned", 0, 5.0, 6.0),
        _ordering_record("yarn", "fine-tuned", 0, 5.0, 6.0),
    ]
    got = {c["claim"][:2]: c for c in orderings({"records": records}, "t")}
    assert (got["1."]["holds"], got["1."]["ties"]) == (0, 1)
    assert (got["5."]["holds"], got["5."]["ties"]) == (0, 1)
    (table,) = ordering_tables({"records": records})
    assert "0/1, 1 tied" in " ".join(" ".join(row) for row in table.rows)
