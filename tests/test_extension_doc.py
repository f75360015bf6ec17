"""docs/extension.md quotes the committed extension records, not numbers typed by hand.

The records behind the page are ``docs/data/extension.json`` (the ``extension.json`` of
``posenc extend``). These tests recompute every generated block and every quoted number
of the page from that file and fail on any difference, on a quote still waiting for its
records (``{{?}}``), on a decimal number in the prose outside a quote, and on a figure
not drawn from the records. The page's machinery (``posenc.pipeline.extension_page``)
is tested on hand-made records first.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from posenc.experiments.extend import plan_base
from posenc.experiments.extend_summary import FORMAT, validate_extension
from posenc.pipeline.extension import curves
from posenc.pipeline.extension_page import BLOCK, BLOCKS, PLACEHOLDER, QUOTE, quote, render_page
from posenc.viz.extension import curves_digest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "extension.md"
RECORDS = DOCS / "data" / "extension.json"
#: Decimal numbers the prose may state without a quote (names, not results).
ALLOWED = ("Llama 3.1",)
#: The page's first line while docs/data/extension.json is not committed: it then states
#: the protocol and no result (every result slot reads {{?}}).
STATUS = "**Status: no committed records.**"


# -- the machinery, on hand-made records ---------------------------------------------------------


def _config(task: dict, train: dict | None = None) -> dict:
    from posenc.experiments.config import config_from_dict

    d = {"task": task, "model": {"encoding": "rope", "dim": 16, "num_layers": 1, "num_heads": 2}, "train": train or {}}
    return config_from_dict(d).to_dict()


def _record(rule, stage, seed, ppl: dict[int, float], run_id: str) -> dict:
    """A shakespeare record at L = 8: ``ppl[length]``; the sliding value is ppl - 1. Its
    two test segments have the same NLL, so a bootstrap over segments is the point and
    every interval comes from the seeds alone."""
    factor = {"zero-shot": None, "fine-tuned": 2, "fine-tuned-covering": None, "baseline": None}[stage]
    metrics = []
    for n, v in ppl.items():
        f = factor or (None if stage == "baseline" else max(1, n // 8))
        if stage == "fine-tuned-covering":
            f = max(2, n // 8)
        nll, sliding = 128 * math.log(v), 128 * math.log(v - 1)
        metrics.append(
            {"length": n, "factor": f, "rope_parameters": None, "ppl": v, "ppl_sliding": v - 1}
            | {"tokens": 256, "segment_tokens": 128, "nll_segments": [nll, nll], "nll_sliding_segments": [sliding] * 2}
        )
    return {
        "task": "shakespeare",
        "seed": seed,
        "rule": rule,
        "stage": stage,
        "train_length": 8,
        "context": 8,
        "finetune_length": 16 if stage.startswith("fine-tuned") else None,
        "run_id": run_id,
        "length_dependent": False,
        "metrics": metrics,
    }


def _data() -> dict:
    """Two seeds; perplexities at 8, 16, 32 chosen by hand."""
    lm = {"name": "shakespeare", "train_length": 8, "eval_factors": [1, 2, 4], "eval_segments": 2, "eval_tokens": 256}
    base = _config(lm)
    ft = _config({**lm, "train_length": 16, "eval_factors": [1, 2]}, {"steps": 3, "batch_size": 4})
    run = {"git_commit": "abc", "torch_version": "t", "train_step": "reference", "cpu_capability": "X"}
    runs = {"base": {"role": "base", "config": base, "wall_time_s": 60.0} | run}
    runs["ft"] = {"role": "fine-tune", "config": ft, "wall_time_s": 30.0} | run
    records = []
    for seed, shift in ((0, 0.0), (1, 1.0)):
        records += [
            _record("none", "zero-shot", seed, {8: 5 + shift, 16: 7 + shift, 32: 9 + shift}, "base"),
            _record("linear", "zero-shot", seed, {8: 5 + shift, 16: 6 + shift, 32: 8 + shift}, "base"),
            _record("yarn", "zero-shot", seed, {8: 5 + shift, 16: 5.5 + shift, 32: 7 + shift}, "base"),
            _record("none", "fine-tuned", seed, {8: 4 + shift, 16: 4 + shift, 32: 6 + shift}, "ft"),
            _record("linear", "fine-tuned", seed, {8: 4.5 + shift, 16: 4.5 + shift, 32: 8 + shift}, "ft"),
            _record("linear", "fine-tuned-covering", seed, {8: 4.5 + shift, 16: 4.5 + shift, 32: 5 + shift}, "ft"),
            _record("yarn", "fine-tuned", seed, {8: 4 + shift, 16: 4.2 + shift, 32: 7 + shift}, "ft"),
            _record("yarn", "fine-tuned-covering", seed, {8: 4 + shift, 16: 4.2 + shift, 32: 4.1 + shift}, "ft"),
        ]
    data = {
        "format": FORMAT,
        "kind": "posenc-extension",
        "command": "posenc extend",
        "git_commit": "abc",
        "torch_version": "t",
        "cpu_capability": "X",
        "python_version": "3",
        "threads": 1,
        "rules": ["none", "linear", "yarn"],
        "factors": [2, 4],
        "baselines": [],
        "baselines_missing": [],
        "finetune": {"factor": 2, "steps": 3, "batch_size": None, "lr": 1e-3, "warmup": 1},
        "base_runs": [],
        "runs": runs,
        "records": records,
    }
    return validate_extension(data)


def _skeleton(quotes: list[str]) -> str:
    blocks = "\n".join(f"<!-- generated:{b} -->\n{PLACEHOLDER}\n<!-- /generated:{b} -->\n" for b in BLOCKS)
    return blocks + "\n".join(f"<!--q {q}-->{PLACEHOLDER}<!--/q-->" for q in quotes) + "\n"


def test_quotes_by_hand():
    """Two seeds A, B: a pooled perplexity is the geometric mean of the two, and a
    bootstrap over seeds draws AA (a quarter of the time), AB/BA or BB, so its 95%
    interval runs from the AA value to the BB value."""
    data = _data()
    # yarn fine-tuned-covering at 32: 4.1 and 5.1 -> sqrt(4.1 * 5.1) = 4.573
    assert quote(data, "cell shakespeare ppl yarn fine-tuned-covering 32") == "4.57 [4.10, 5.10]"
    assert quote(data, "mean shakespeare ppl_sliding yarn fine-tuned-covering 32") == "3.57"  # sqrt(3.1 * 4.1)
    # none zero-shot ratio 32 / 8, paired by seed: 9/5 = 1.8, 10/6 = 1.667, pooled sqrt(90 / 30)
    assert quote(data, "ratio shakespeare ppl none zero-shot 32") == "1.73 [1.67, 1.80]"
    # claim 6: yarn covering at 32 (4.1, 5.1) against yarn fine-tuned at 16 (4.2, 5.2): better on both seeds,
    # ratio sqrt(4.1 * 5.1 / (4.2 * 5.2)) = 0.9785, AA 4.1 / 4.2, BB 5.1 / 5.2
    assert quote(data, "claim shakespeare ppl 6 32") == "agrees: 2/2, ratio 0.978 [0.976, 0.981]"
    assert quote(data, "holds shakespeare ppl 6 32") == "2/2"
    assert quote(data, "verdict shakespeare ppl 6 32") == "agrees"
    # claim 2: linear zero-shot (6, 7) against none zero-shot (7, 8) at 16
    assert quote(data, "claim shakespeare ppl 2 16") == "agrees: 2/2, ratio 0.866 [0.857, 0.875]"
    # claim 5 at 32: yarn fine-tuned (7, 8) against linear fine-tuned (8, 9): better, interval below 1
    assert quote(data, "verdict shakespeare ppl 5 32") == "agrees"
    # claim 1 at 16 by the sliding value: none zero-shot (6, 7) worse than at L (4, 5)
    assert quote(data, "verdict shakespeare ppl_sliding 1 16") == "agrees"
    assert quote(data, "kept shakespeare none zero-shot") == "2 of 2"  # a corpus has no bar
    assert quote(data, "at shakespeare ppl none zero-shot 32 1") == "10.000"
    assert quote(data, "seeds shakespeare") == "2" and quote(data, "meta torch_version") == "t"
    for bad, msg in [
        ("cell shakespeare ppl ntk zero-shot 16", "no records of 'ntk'"),
        ("claim shakespeare ppl 4 32", "not checked at length 32"),  # claim 4 stops at the fine-tuning length
        ("cell shakespeare token_accuracy none zero-shot 16", "no interval for metric 'token_accuracy'"),
        ("at shakespeare ppl none zero-shot 32 7", "no seed 7"),
        ("median shakespeare", "unknown kind 'median'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            quote(data, bad)


def _copy(rule, stage, seed, hits: dict[int, int], run_id: str = "base") -> dict:
    """A copy record at L = 4 with 100 test examples per length: ``hits[length]`` exact."""
    metrics = [
        {"length": n, "factor": 1, "rope_parameters": None, "exact_match": h / 100, "token_accuracy": h / 100}
        | {"samples": 100, "exact_hits": h, "tokens": 400, "token_hits": 4 * h}
        for n, h in hits.items()
    ]
    return {
        "task": "copy",
        "seed": seed,
        "rule": rule,
        "stage": stage,
        "train_length": 4,
        "context": 9,
        "finetune_length": 8 if stage.startswith("fine-tuned") else None,
        "run_id": run_id,
        "length_dependent": False,
        "metrics": metrics,
    }


def test_a_run_that_lost_the_task_is_never_compared():
    """Seed 1's PI fine-tune loses copy at L (exact match 0.5 < 0.9): its row pools seed 0
    only, and a claim that reads it is judged on seed 0 or, with no seed left, not at all."""
    from posenc.experiments.extend_claims import orderings
    from posenc.experiments.extend_summary import extension_tables

    records = []
    for seed in (0, 1):
        records += [
            _copy("none", "zero-shot", seed, {4: 100, 8: 10}),
            _copy("linear", "zero-shot", seed, {4: 100, 8: 30}),
            _copy("none", "fine-tuned", seed, {4: 95 if seed == 0 else 40, 8: 60}),
            _copy("linear", "fine-tuned", seed, {4: 99 if seed == 0 else 50, 8: 80}),
        ]
    data = {"records": records}
    (table,) = extension_tables(data)
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["linear fine-tuned@8"][0] == "1 of 2"
    # seed 0 alone: 80 of 100, Wilson's interval is not needed (0 < 0.8 < 1): a bootstrap over examples
    assert rows["linear fine-tuned@8"][2].startswith("0.80 [")
    # Wilson's interval at 200 of 200: its lower end is 1 / (1 + 1.96**2 / 200)
    assert rows["none zero-shot"][:2] == ["2 of 2", "1.00 [0.98, 1.00]"]
    got = {(c["number"], c["length"]): c for c in orderings(data, "copy")}
    assert (got[7, 8]["seeds"], got[7, 8]["of"], got[7, 8]["holds"]) == (1, 2, 1)  # 0.80 > 0.60 on seed 0
    assert got[2, 8]["verdict"] == "agrees" and got[2, 8]["est"] == pytest.approx(0.2)
    lost = [r for r in records if r["seed"] == 0 and r["rule"] == "linear" and r["stage"] == "fine-tuned"]
    lost[0]["metrics"][0]["exact_match"] = 0.5  # now no seed kept PI's fine-tune
    got = {(c["number"], c["length"]): c for c in orderings(data, "copy")}
    assert got[7, 8]["verdict"] == "not judged" and got[4, 8]["verdict"] == "not judged"
    (table,) = extension_tables(data)
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["linear fine-tuned@8"][:2] == ["0 of 2", "did not keep the task (exact match at L < 0.9)"]


def test_render_fills_every_block_and_quote_and_detects_a_change():
    data = _data()
    page = render_page(_skeleton(["cell shakespeare ppl none zero-shot 32"]), data)
    assert PLACEHOLDER not in page
    # sqrt(9 * 10) = 9.487; past-factor at 32: factor 4 (covers) sqrt(5 * 6), factor 2 sqrt(8 * 9)
    assert "<!--q cell shakespeare ppl none zero-shot 32-->9.49 [9.00, 10.00]<!--/q-->" in page
    assert "| linear | 2 of 2 | 5.48 [5.00, 6.00] | 2 of 2 | 8.49 [8.00, 9.00] |" in page
    assert "2 base runs" not in page and "1 base runs (1.0 min of training)" in page
    assert render_page(page, data) == page  # a rendered page is a fixed point
    changed = page.replace("9.49 [9.00, 10.00]", "9.40 [9.00, 10.00]")
    assert render_page(changed, data) != changed
    with pytest.raises(ValueError, match="needs each of"):
        render_page(page.replace("<!-- generated:orderings -->", ""), data)


def test_prose_numbers_are_quotes():
    bad = "Here the ratio is 0.98 and 3/3 seeds agree."
    assert _unquoted_numbers(bad) == ["0.98", "3/3"]
    ok = "A quote <!--q cell t ppl none zero-shot 8-->7.41 ± 0.07<!--/q-->, `0.1 ln s + 1`, Llama 3.1, 8L."
    assert _unquoted_numbers(ok) == []


# -- the page, on the committed records ----------------------------------------------------------


def _unquoted_numbers(page: str) -> list[str]:
    """Decimal numbers and ``k/n`` fractions of ``page`` outside generated blocks, quotes,
    code, link targets and the allowed names."""
    text = BLOCK.sub("", page)
    text = QUOTE.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    for name in ALLOWED:
        text = text.replace(name, "")
    return re.findall(r"\d+\.\d+|\b\d+/\d+\b", text)


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def data() -> dict:
    if not RECORDS.is_file():
        pytest.skip(
            f"{RECORDS} is not committed (the page says so: {STATUS}); to fill it run `posenc extend --out "
            "runs/extend --threads 1` from a clean tree, copy its extension.json there and run "
            "posenc.pipeline.extension_page.write_extension_page()"
        )
    return validate_extension(json.loads(RECORDS.read_text(encoding="utf-8")))


def test_page_has_no_placeholder_and_no_unquoted_number(page):
    assert _unquoted_numbers(page) == [], "a number in docs/extension.md's prose is not a quote of the records"
    if not RECORDS.is_file():  # no records: the page must say so, and every result slot is empty
        assert STATUS in page, f"docs/data/extension.json is not committed, and the page does not say {STATUS!r}"
        assert {value for _, value in QUOTE.findall(page)} <= {PLACEHOLDER}, "a quote holds a value without records"
        return
    assert STATUS not in page, "the records are committed: remove the status line"
    assert PLACEHOLDER not in page and "{{" not in page, "a quote or block of docs/extension.md awaits its records"


def test_records_are_the_quick_preset_from_a_committed_tree(data):
    assert not data["git_commit"].endswith("+dirty") and data["git_commit"] != "unknown"
    assert data["torch_version"] and data["cpu_capability"] and data["python_version"]
    base_ids = {r["run_id"] for r in data["records"] if r["stage"] == "zero-shot"}
    assert base_ids == {c.run_id for c in plan_base("quick")}
    for run in data["runs"].values():
        assert run["train_step"] in ("fast", "reference") and run["cpu_capability"]
    # the length-dependent rule was scored as such (prefix by prefix, by the evaluation functions)
    assert {r["rule"] for r in data["records"] if r["length_dependent"]} == {"dynamic"}


def test_page_is_the_records(page, data):
    rendered = render_page(page, data)
    if rendered != page:
        diff = "\n".join(list(difflib.unified_diff(page.splitlines(), rendered.splitlines(), lineterm=""))[:40])
        pytest.fail(f"docs/extension.md differs from its records (write_extension_page() regenerates it):\n{diff}")


def _kept(record: dict) -> bool:
    at_l = next(m for m in record["metrics"] if m["length"] == record["train_length"])
    return "exact_match" not in at_l or at_l["exact_match"] >= 0.9


def test_cell_quotes_recomputed_from_the_raw_records(page, data):
    """Every ``cell`` and ``ratio`` quote, recomputed here from the metric entries: the
    seeds kept at L, the pooled value from the counts, the interval from ``stats``."""
    from posenc.experiments.stats import paired_ppl_draws, pooled_ci, pooled_ppl_ci, wilson_ci

    checked = 0
    for spec, value in QUOTE.findall(page):
        kind, *args = spec.split()
        if kind not in ("cell", "ratio"):
            continue
        task, key, rule, stage, n = args
        recs = [r for r in data["records"] if (r["task"], r["rule"], r["stage"]) == (task, rule, stage) and _kept(r)]
        at = [{m["length"]: m for m in r["metrics"]} for r in recs]
        L = recs[0]["train_length"]
        segments = "nll_segments" if key == "ppl" else "nll_sliding_segments"
        if kind == "ratio":
            runs = [[(m[k][segments], m[k]["segment_tokens"]) for k in (int(n), L)] for m in at]
            pooled = [
                sum(sum(run[i][0]) for run in runs) / sum(len(run[i][0]) * run[i][1] for run in runs) for i in (0, 1)
            ]
            est = math.exp(pooled[0] - pooled[1])
            draws = paired_ppl_draws(runs, seed=0)
            lo, hi = (float(x) for x in np.quantile(draws[:, 0] / draws[:, 1], [0.025, 0.975]))
        elif key == "exact_match":
            counts = [(m[int(n)]["exact_hits"], m[int(n)]["samples"]) for m in at]
            est = statistics.fmean(h / k for h, k in counts)
            pooled = (sum(h for h, _ in counts), sum(k for _, k in counts))
            lo, hi = wilson_ci(*pooled) if est in (0.0, 1.0) else pooled_ci(counts, seed=0)
        else:
            runs = [(m[int(n)][segments], m[int(n)]["segment_tokens"]) for m in at]
            est = math.exp(sum(sum(x) for x, _ in runs) / sum(len(x) * t for x, t in runs))
            lo, hi = pooled_ppl_ci(runs, seed=0)
        assert value == f"{est:.2f} [{lo:.2f}, {hi:.2f}]", spec
        checked += 1
    assert checked >= 10


def test_figures_are_drawn_from_the_records(data):
    from PIL import Image

    for task in {r["task"] for r in data["records"]}:
        path = DOCS / "img" / f"extension_{task}.png"
        assert path.is_file(), f"{path} is missing: write_extension_page() draws it"
        description = Image.open(path).text.get("Description", "")
        assert description == f"posenc-extension {curves_digest(curves(data, task))}", path
