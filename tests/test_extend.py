"""posenc extend: rule swaps give exactly rope_frequencies' frequencies, the factor that
covers a length, the fine-tune hook starts from the base weights and never trains on
its base run's test set, dynamic NTK is scored prefix by prefix, the command writes its
outputs, bad input is one line."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

import posenc
from posenc.cli import app
from posenc.data.synthetic import SyntheticTask
from posenc.experiments.config import config_from_dict, replace
from posenc.experiments.evaluate import lm_metrics, synthetic_metrics
from posenc.experiments.extend import (
    RULES,
    Finetune,
    check_rules,
    finetune_config,
    plan_base,
    rule_parameters,
    swap_rule,
    trained_context,
    validate_extension,
)
from posenc.experiments.extend_claims import ordering_tables, orderings
from posenc.experiments.extend_rules import covering_factor, has_factor
from posenc.experiments.extend_score import check_disjoint, score
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


def test_covering_factor_by_hand():
    """ceil(positions / C), at least the minimum: corpus positions = length; copy reads
    2n + 1 positions (BOS, n symbols, SEP, n - 1 answers) and C = 2L + 1."""
    lm = config_from_dict({"task": {"name": "shakespeare", "train_length": 32}, "model": {"encoding": "rope"}})
    assert [covering_factor(lm, n) for n in (32, 64, 100, 128, 256)] == [1, 2, 4, 4, 8]
    assert [covering_factor(lm, n, 4) for n in (32, 64, 128, 256)] == [4, 4, 4, 8]
    copy = config_from_dict({**TINY, "task": {**TINY["task"], "train_length": 8}})
    assert trained_context(copy) == 17
    assert [covering_factor(copy, n) for n in (8, 16, 32, 64)] == [1, 2, 4, 8]  # 17, 33, 65, 129 positions
    cfg = config_from_dict(TINY)  # L = 3, C = 7: n = 24 reads 49 positions = 7 * 7
    assert covering_factor(cfg, 24) == 7 and covering_factor(cfg, 25) == 8
    assert [has_factor(r) for r in RULES] == [r != "none" for r in RULES]
    with pytest.raises(ValueError, match="minimum must be >= 1"):
        covering_factor(cfg, 8, 0)


def test_dynamic_is_scored_prefix_by_prefix():
    """The extension scores through the evaluation functions, which score a
    length-dependent encoding (dynamic NTK) prefix by prefix: its metrics are the
    prefix-consistent ones, not the teacher-forced full window's."""
    cfg, model = _model()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    task = SyntheticTask("copy", 4)
    n = 12  # 25 positions, past C = 7: dynamic NTK's frequencies change along the sequence
    _, dyn = swap_rule(model, cfg, "dynamic", 4)
    assert dyn.pe.length_dependent
    kwargs = {"samples": cfg.task.eval_samples, "seed": cfg.train.seed}
    assert score(dyn, cfg, [n], {}) == synthetic_metrics(dyn, task, [n], prefix_consistent=True, **kwargs)
    _, yarn = swap_rule(model, cfg, "yarn", 4)  # a static rule: one forward is already prefix-consistent
    assert score(yarn, cfg, [n], {}) == synthetic_metrics(yarn, task, [n], prefix_consistent=False, **kwargs)
    # on a corpus the two scorings give different perplexities, and the extension's is the prefix one
    lm_task = {"name": "shakespeare", "train_length": 8, "max_chars": 20_000, "eval_factors": [1, 4]}
    lm = config_from_dict({**TINY, "task": lm_task | {"eval_segments": 2, "eval_tokens": 128, "sliding_stride": 8}})
    run_setup = setup(lm)
    torch.manual_seed(0)
    base = build_model(lm, run_setup.vocab_size, run_setup.max_len)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.5)
    _, dyn = swap_rule(base, lm, "dynamic", 4)
    got = score(dyn, lm, [32], {})
    prefix, full = (lm_metrics(dyn, run_setup.corpus, [32], stride=8, prefix_consistent=flag) for flag in (True, False))
    assert got == prefix and got[0]["ppl"] != pytest.approx(full[0]["ppl"], rel=1e-6)


def test_finetune_never_trains_on_the_base_test_set():
    """The quick preset's corpus fine-tune holds out units that cover its base run's,
    so no scored test token of the base lies in the fine-tune's training text."""
    (base,) = plan_base("quick", tasks=["shakespeare"], seeds=[0])
    ft = finetune_config(base, "yarn", Finetune(factor=4, steps=1), "unused.pt")
    b, f = setup(base).corpus, setup(ft).corpus
    check_disjoint(f, b)
    lo, hi = b.test.starts, b.validation.starts + b.validation.tokens.shape[1]  # [k] each base unit
    unit = f.test.tokens.shape[1] + f.validation.tokens.shape[1]
    assert bool(((f.test.starts <= lo) & (hi <= f.test.starts + unit)).all())  # fine-tune units cover the base's
    # 8 segments sit at the boundaries of the 16 blocks: in the base's training text
    with pytest.raises(ValueError, match="overlaps 8 test segment"):
        check_disjoint(b, setup(replace(base, task={"eval_segments": 8})).corpus)


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
        "2,4",
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
    # not a terminal: one timestamped line per stage (a log of hours of work)
    assert re.search(r"^\d\d:\d\d:\d\d base rope copy seed 0$", text, re.M), text
    assert re.search(r"^\d\d:\d\d:\d\d fine-tune yarn at 6$", text, re.M), text
    data = validate_extension(json.loads((out / "extension.json").read_text()))
    assert data["rules"] == ["none", "linear", "yarn"] and data["factors"] == [2, 4]
    assert data["baselines"] == ["alibi"] and data["finetune"]["factor"] == 2
    stages = [(r["rule"], r["stage"]) for r in data["records"]]
    assert stages == [
        ("none", "zero-shot"),
        ("linear", "zero-shot"),
        ("yarn", "zero-shot"),
        ("none", "fine-tuned"),
        ("linear", "fine-tuned"),
        ("linear", "fine-tuned-covering"),
        ("yarn", "fine-tuned"),
        ("yarn", "fine-tuned-covering"),
        ("alibi", "baseline"),
    ]
    for r in data["records"]:  # L = 3, factors 2 and 4 (finetune factor 2)
        assert [m["length"] for m in r["metrics"]] == [3, 6, 12]
        expected = {"zero-shot": [1, 2, 4], "fine-tuned": [2, 2, 2], "fine-tuned-covering": [2, 2, 4]}
        assert [m["factor"] for m in r["metrics"]] == expected.get(r["stage"], [None] * 3)
        assert all(0.0 <= m["token_accuracy"] <= 1.0 for m in r["metrics"])
        assert r["run_id"] in data["runs"] and r["length_dependent"] is False
        for m in r["metrics"]:
            if m["factor"] is not None:
                assert m["rope_parameters"] == rule_parameters(r["rule"], m["factor"], 7, rotary_dim=8)
    by = {(r["rule"], r["stage"]): r for r in data["records"]}
    for rule in ("linear", "yarn"):  # up to the fine-tuning length the covering factor is the fine-tune's
        fixed, covering = by[(rule, "fine-tuned")]["metrics"], by[(rule, "fine-tuned-covering")]["metrics"]
        assert covering[:2] == fixed[:2] and covering[2]["factor"] == 4
    assert {run["role"] for run in data["runs"].values()} == {"base", "fine-tune", "baseline"}
    assert data["cpu_capability"] and data["python_version"] and data["threads"] >= 1
    # at L every rule is plain RoPE (factor 1), so the zero-shot scores agree there
    at_L = {r["metrics"][0]["token_accuracy"] for r in data["records"] if r["stage"] == "zero-shot"}
    assert len(at_L) == 1
    md = (out / "extension.md").read_text()
    assert "copy: exact match" in md and "published orderings" in md
    assert (out / "plots" / "extension_copy.png").stat().st_size > 1000
    # the HTML report's section (posenc.pipeline.report.write_report(extra_sections=[...]))
    sec = extension_report_section(out / "extension.json")
    assert set(sec) == {"title", "text", "tables", "figures"} and "posenc extend" in sec["text"]
    assert sec["tables"][0]["columns"] == ["rule / stage", "seeds kept", "3 (1L)", "6 (2L)", "12 (4L)"]
    assert len(sec["tables"][0]["rows"]) == 7  # 3 zero-shot, 3 fine-tuned (covering where a factor exists), alibi
    assert [cap for cap, _ in sec["figures"]] == ["copy: each rule against evaluation length"]
    with pytest.raises(ValueError, match="does not exist"):
        extension_report_section(tmp_path / "nope.json")
    html_path = tmp_path / "report.html"
    report_args = ["report", "-o", str(html_path), "--encodings", "rope", "--attention-steps", "0"]
    code, output = _cli([*report_args, "--no-pretrained", "--extension", str(out / "extension.json")])
    assert code == 0, output
    html = html_path.read_text()
    assert "copy: each rule against evaluation length" in html and html.count("data:image/png;base64") >= 1
    # running again reuses every finished run and saved score (nothing retrained) and gives
    # the same numbers; the provenance states the threads of this command
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, _ = _cli([*args, "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    again = json.loads((out / "extension.json").read_text())
    assert again["records"] == data["records"] and again["threads"] == 1


def test_cli_bad_input_is_one_line(tmp_path):
    sin_cfg = config_from_dict({**TINY, "model": {**TINY["model"], "encoding": "sinusoidal"}})
    train_run(sin_cfg, tmp_path / "s")
    not_rope = checkpoint_path(tmp_path / "s", sin_cfg.run_id)
    out = str(tmp_path / "o")
    cases = [
        (["extend", "--rules", "none,ntk2", "--out", out], "unknown rule 'ntk2'"),
        (["extend", "--factors", "2,0", "--out", out], "factor must be >= 1"),
        (["extend", "--finetune-factor", "0", "--out", out], "finetune_factor must be >= 1"),
        (["extend", "--finetune-lr", "0", "--out", out], "finetune lr must be > 0"),
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
    """An extension record of task "t" at L = 10: perplexity ``at_l`` at L, ``at_2l`` at 2L
    (two test segments of 10 tokens with the same NLL: only the seeds vary)."""
    return {
        "task": "t",
        "seed": seed,
        "rule": rule,
        "stage": stage,
        "train_length": 10,
        "context": 10,
        "finetune_length": 20 if stage == "fine-tuned" else None,
        "metrics": [
            {"length": n, "factor": f, "ppl": v, "ppl_sliding": v, "segment_tokens": 10}
            | {"nll_segments": [10 * math.log(v)] * 2, "nll_sliding_segments": [10 * math.log(v)] * 2}
            for n, f, v in ((10, 1, at_l), (20, 2, at_2l))
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
    # the pooled perplexity is the geometric mean over seeds: claim 2's ratio is 8 / 40 on both seeds
    assert got["2."]["holds"] == 2 and got["2."]["est"] == pytest.approx(0.2) and got["2."]["verdict"] == "agrees"
    assert got["2."]["lo"] == pytest.approx(0.2) and got["2."]["hi"] == pytest.approx(0.2)
    # claim 3: ntk (6, 9) against linear (8, 8); seed draws AA 0.75, BB 1.125: the interval straddles 1
    assert got["3."]["holds"] == 1 and got["3."]["est"] == pytest.approx(math.sqrt(54) / 8)
    assert (got["3."]["lo"], got["3."]["hi"]) == pytest.approx((0.75, 1.125)) and got["3."]["verdict"] == "undecided"
    # recovery = (none(20) - linear_ft(20)) / (none(20) - base(10)): (40-5.5)/35, (40-30)/35
    assert got["4."]["per_seed"] == pytest.approx([34.5 / 35, 10 / 35])
    assert got["4."]["holds"] == 1 and got["4."]["effect"] == "recovery"
    pooled_linear = math.sqrt(5.5 * 30.0)  # none zero-shot pools to 40 at 20 and 5 at 10
    assert got["4."]["est"] == pytest.approx((40 - pooled_linear) / 35)
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
    assert (got["1."]["holds"], got["1."]["ties"], got["1."]["verdict"]) == (0, 1, "undecided")
    assert (got["5."]["holds"], got["5."]["ties"], got["5."]["verdict"]) == (0, 1, "undecided")
    # claim 4: direct extrapolation lost nothing at 2L, so there is no gap to recover
    assert (got["4."]["holds"], got["4."]["verdict"]) == (0, "undecided") and math.isnan(got["4."]["lo"])
    tables = ordering_tables({"records": records})  # by ppl and by ppl_sliding (the same values here)
    assert [t.title.split(" by ")[1].split(":")[0] for t in tables] == ["ppl", "ppl_sliding"]
    assert all("0/1, 1 tied" in " ".join(" ".join(row) for row in t.rows) for t in tables)


def test_finetune_settings_override_the_presets_budget():
    from posenc.experiments.extend import PRESETS, finetune_settings

    preset = PRESETS["quick"][2]
    assert finetune_settings("quick") == preset
    tuned = finetune_settings("quick", factor=2, steps=1000, lr=3e-4)
    assert (tuned.factor, tuned.steps, tuned.lr, tuned.warmup) == (2, 1000, 3e-4, preset.warmup)
    assert finetune_settings("quick", steps=0) is None
    with pytest.raises(ValueError, match="finetune lr must be > 0"):
        finetune_settings("quick", lr=-1e-3)
