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
import re
import statistics
from pathlib import Path

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
    """A shakespeare record at L = 8: ``ppl[length]``; the sliding value is ppl - 1."""
    factor = {"zero-shot": None, "fine-tuned": 2, "fine-tuned-covering": None, "baseline": None}[stage]
    metrics = []
    for n, v in ppl.items():
        f = factor or (None if stage == "baseline" else max(1, n // 8))
        if stage == "fine-tuned-covering":
            f = max(2, n // 8)
        metrics.append(
            {"length": n, "factor": f, "rope_parameters": None, "ppl": v, "ppl_sliding": v - 1}
            | {"tokens": 256, "segment_tokens": 128, "nll_segments": [1.0, 2.0], "nll_sliding_segments": [1.0, 2.0]}
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
    data = _data()
    # seeds 0, 1: yarn fine-tuned-covering at 32 is 4.1 and 5.1 -> mean 4.6, std 0.7071
    assert quote(data, "cell shakespeare ppl yarn fine-tuned-covering 32") == "4.60 ± 0.71"
    assert quote(data, "mean shakespeare ppl_sliding yarn fine-tuned-covering 32") == "3.60"
    # none zero-shot ratio 32 / 8: 9/5 = 1.8 and 10/6 = 1.667 -> 1.73 ± 0.09
    assert quote(data, "ratio shakespeare ppl none zero-shot 32") == "1.73 ± 0.09"
    assert quote(data, "cmp shakespeare ppl yarn fine-tuned-covering 32 yarn fine-tuned 16") == "lower"
    assert quote(data, "cmp shakespeare ppl yarn fine-tuned 32 yarn fine-tuned 16") == "higher"
    # claim 6: yarn covering at 32 (4.1, 5.1) better than yarn fine-tuned at 16 (4.2, 5.2) on both seeds
    assert quote(data, "claim shakespeare ppl 6 32") == "2/2 (4.6 vs 4.7)"
    assert quote(data, "holds shakespeare ppl 6 32") == "2/2"
    # claim 2: linear zero-shot better than none zero-shot at 16 on both seeds
    assert quote(data, "claim shakespeare ppl 2 16") == "2/2 (6.5 vs 7.5)"
    assert quote(data, "seeds shakespeare") == "2" and quote(data, "meta torch_version") == "t"
    for bad, msg in [
        ("cell shakespeare ppl ntk zero-shot 16", "no records of 'ntk'"),
        ("claim shakespeare ppl 4 32", "not checked at length 32"),  # claim 4 stops at the fine-tuning length
        ("median shakespeare", "unknown kind 'median'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            quote(data, bad)


def test_render_fills_every_block_and_quote_and_detects_a_change():
    data = _data()
    page = render_page(_skeleton(["cell shakespeare ppl none zero-shot 32"]), data)
    assert PLACEHOLDER not in page
    assert "<!--q cell shakespeare ppl none zero-shot 32-->9.50 ± 0.71<!--/q-->" in page
    assert "| linear | 5.50 ± 0.71 | 8.50 ± 0.71 |" in page  # past-factor: 32, factor 4 (covers) vs factor 2
    assert "2 base runs" not in page and "1 base runs (1.0 min of training)" in page
    assert render_page(page, data) == page  # a rendered page is a fixed point
    changed = page.replace("9.50 ± 0.71", "9.40 ± 0.71")
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


def test_cell_quotes_recomputed_from_the_raw_records(page, data):
    """Every ``cell`` and ``ratio`` quote, recomputed here from the metric entries alone."""
    checked = 0
    for spec, value in QUOTE.findall(page):
        kind, *args = spec.split()
        if kind not in ("cell", "ratio"):
            continue
        task, key, rule, stage, n = args
        recs = [r for r in data["records"] if (r["task"], r["rule"], r["stage"]) == (task, rule, stage)]
        at = [{m["length"]: m[key] for m in r["metrics"]} for r in recs]
        vals = [
            v[int(n)] / v[r["train_length"]] if kind == "ratio" else v[int(n)] for v, r in zip(at, recs, strict=True)
        ]
        d = 2 if kind == "ratio" or key.startswith("ppl") else 3
        want = f"{statistics.fmean(vals):.{d}f}" + (f" ± {statistics.stdev(vals):.{d}f}" if len(vals) > 1 else "")
        assert value == want, spec
        checked += 1
    assert checked >= 10


def test_figures_are_drawn_from_the_records(data):
    from PIL import Image

    for task in {r["task"] for r in data["records"]}:
        path = DOCS / "img" / f"extension_{task}.png"
        assert path.is_file(), f"{path} is missing: write_extension_page() draws it"
        description = Image.open(path).text.get("Description", "")
        assert description == f"posenc-extension {curves_digest(curves(data, task))}", path
