"""docs/mechanisms.md is its records: the first N lines of docs/data/study_results.jsonl.

The page states N (its status line quotes ``records``); records are only appended, so
these tests read those N lines, recompute every generated block and quote of the page
and fail on any difference, on a decimal number in the prose outside a quote, and on a
figure not drawn from those records. The machinery (``counted_records``,
``posenc.pipeline.mechanisms_page``, ``posenc.viz.mechanisms``) is tested on hand-made
records first, against values worked out by hand from the recovery formula.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from posenc.data.synthetic import SyntheticTask
from posenc.experiments.diagnose_summary import MIN_DROP, counted_records
from posenc.experiments.study import LR_GRID
from posenc.experiments.summary import in_distribution, run_lr, selected
from posenc.pipeline.extension_page import BLOCK, QUOTE
from posenc.pipeline.mechanisms_page import (
    BLOCKS,
    figure_data,
    mechanisms_report_section,
    page_blocks,
    quote,
    read_first,
    render_page,
)
from posenc.viz.mechanisms import mechanisms_digest, plot_mechanisms, recovery_matrix, recovery_texts

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "mechanisms.md"
RECORDS = DOCS / "data" / "study_results.jsonl"
CONDITIONS = ("none", "shifted", "window", "temperature", "window_temperature")
COUNT = re.compile(r"<!--q records-->(\d+)<!--/q-->")


# -- hand-made records --------------------------------------------------------------------------


def _probes(ref: float, at: dict[int, dict[str, float]], entropy: float = 1.0) -> dict:
    """Synthetic probes at L = 8: exact match ``ref`` at L, ``at[E][condition]`` at each E;
    the attention entropy is ``entropy`` + (0, 1, 2, 3) over 2 layers x 2 heads (mean + 1.5)."""

    def m(em: float) -> dict:
        return {"exact_match": em, "token_accuracy": em, "samples": 4}

    heads = [[entropy, entropy + 1], [entropy + 2, entropy + 3]]
    attention = [
        {"length": n, "uniform_entropy": float(n), "entropy": heads, "near_mass": [[1.0, 1.0], [0.5, 0.5]]}
        for n in (8, *at)
    ]
    return {
        "kind": "synthetic",
        "train_length": 8,
        "window": 17,
        "reference": m(ref),
        "lengths": [
            {"length": e, "tau": 1.25, "offset": e, **{c: m(v) for c, v in conds.items()}} for e, conds in at.items()
        ],
        "attention": attention,
        "samples": 4,
        "attention_samples": 2,
    }


def _conds(none, shifted, window, temperature, both) -> dict[str, float]:
    return dict(zip(CONDITIONS, (none, shifted, window, temperature, both), strict=True))


#: seed 0: recoveries at 16 = (0.36 - 0.2) / 0.8 = 0.2, 0.9, 0.25, 1.0; at 32: no drop (0.95).
P0 = _probes(1.0, {16: _conds(0.2, 0.36, 0.92, 0.4, 1.0), 32: _conds(0.95, 0.95, 0.95, 0.95, 0.95)})
#: seed 1: at 16: 0.6, 0.5, 0.15, 0.0 (drop 1.0); at 32: shifted 0.25, window 0.75, temperature 0.5, both 1.0
P1 = _probes(1.0, {16: _conds(0.0, 0.6, 0.5, 0.15, 0.0), 32: _conds(0.2, 0.4, 0.8, 0.6, 1.0)}, entropy=3.0)


def _record(enc: str, seed: int, lr: float, val: float, em: float, probes: dict | None, task: str = "copy") -> dict:
    """A copy record at L = 8: validation ``val``, exact match ``em`` at every length 1..8."""
    rec = {
        "run_id": f"{task}-{enc}-{seed}-{lr:g}",
        "task": task,
        "encoding": enc,
        "seed": seed,
        "train_length": 8,
        "git_commit": "abc",
        "torch_version": "t",
        "cpu_capability": "X",
        "train_step": "fast",
        "config": {"train": {"lr": lr, "threads": 1}, "model": {"num_layers": 2, "dim": 16, "num_heads": 2}},
        "metrics": [{"length": n, "exact_match": em, "token_accuracy": em} for n in range(1, 9)],
        "validation": {"metric": "exact_match", "value": val, "higher_is_better": True},
    }
    if probes is not None:
        rec["probes"] = probes
    return rec


def _records() -> list[dict]:
    """alibi: a complete sweep, 3e-3 chosen (validation 1.0), seed 1 at that rate; t5: a
    complete sweep whose chosen run (1e-3) did not learn (0.5 < 0.9); rope: 1e-3 only
    (sweep incomplete); sinusoidal: no probes."""
    return [
        _record("alibi", 0, 1e-3, 0.9, 0.9, P1),
        _record("alibi", 0, 3e-3, 1.0, 1.0, P0),
        _record("alibi", 0, 1e-2, 0.5, 0.5, P1),
        _record("t5", 0, 1e-3, 0.6, 0.5, P0),
        _record("t5", 0, 3e-3, 0.4, 0.4, P0),
        _record("t5", 0, 1e-2, 0.3, 0.3, P0),
        _record("rope", 0, 1e-3, 1.0, 1.0, P0),
        _record("alibi", 1, 3e-3, 1.0, 1.0, P1),
        _record("sinusoidal", 0, 3e-3, 1.0, 1.0, None),
    ]


def _ids(records: list[dict]) -> list[str]:
    return [r["run_id"] for r in records]


def test_counted_records_by_hand():
    records = _records()
    for grid in (LR_GRID, None):  # the records span the grid: the same either way
        counted, out = counted_records(records, grid=grid)
        assert _ids(counted) == ["copy-alibi-0-0.003", "copy-alibi-1-0.003"]
        assert _ids(out["not chosen"]) == [
            "copy-alibi-0-0.001",
            "copy-alibi-0-0.01",
            "copy-t5-0-0.003",
            "copy-t5-0-0.01",
        ]
        assert _ids(out["did not learn"]) == ["copy-t5-0-0.001"]
        assert _ids(out["sweep incomplete"]) == ["copy-rope-0-0.001"]
        assert _ids(out["no probes"]) == ["copy-sinusoidal-0-0.003"]
    # without a sweep (one rate everywhere) every learned record counts
    flat = [_record("rope", 0, 3e-3, 1.0, 1.0, P0), _record("t5", 0, 3e-3, 1.0, 0.5, P0)]
    counted, out = counted_records(flat)
    assert _ids(counted) == ["copy-rope-0-0.003"] and _ids(out["did not learn"]) == ["copy-t5-0-0.003"]


def test_figure_data_by_hand():
    counted, _ = counted_records(_records(), grid=LR_GRID)
    data = figure_data(counted, "copy")
    assert data.encodings == ["alibi"] and data.lengths == [16, 32] and data.train_length == 8
    # at 16: the mean of the two seeds; at 32: seed 1 only (seed 0 has no drop)
    assert data.recovery["alibi"][16] == pytest.approx(
        {"shifted": 0.4, "window": 0.7, "temperature": 0.2, "window_temperature": 0.5}
    )
    assert data.recovery["alibi"][32] == pytest.approx(
        {"shifted": 0.25, "window": 0.75, "temperature": 0.5, "window_temperature": 1.0}
    )
    assert data.drops == {"alibi": {16: "2/2", 32: "1/2"}}
    # entropy: per record the mean over 2 x 2 heads (entropy + 1.5), then over seeds: (2.5 + 4.5) / 2
    assert data.entropy == {"alibi": {8: 3.5, 16: 3.5, 32: 3.5}} and data.uniform == {8: 8.0, 16: 16.0, 32: 32.0}
    assert recovery_matrix(data)[0] == pytest.approx([0.4, 0.7, 0.2, 0.5, 0.25, 0.75, 0.5, 1.0])
    with pytest.raises(ValueError, match="no records with probes of task 'sort'"):
        figure_data(counted, "sort")


def test_no_drop_cells_and_the_digest(tmp_path):
    from PIL import Image

    rec = _record("alibi", 0, 3e-3, 1.0, 1.0, P0)
    data = figure_data([rec], "copy")
    assert data.recovery["alibi"][32] is None
    assert recovery_texts(data)[0] == ["0.20", "0.90", "0.25", "1.00", *["no drop"] * 4]
    path = plot_mechanisms(data, tmp_path / "m.png")
    assert Image.open(path).text["Description"] == f"posenc-mechanisms {mechanisms_digest(data)}"
    other = figure_data([_record("alibi", 0, 3e-3, 1.0, 1.0, P1)], "copy")
    assert mechanisms_digest(other) != mechanisms_digest(data)


def test_quotes_and_render_by_hand():
    records = _records()
    assert quote(records, "records") == "9" and quote(records, "counted") == "2"
    assert quote(records, "tasks") == "copy" and quote([], "tasks") == "none"
    assert quote(records, "max copy window 2") == "0.70"  # alibi's mean at 16, the only counted encoding
    assert quote(records, "max copy temperature 4") == "0.50"
    for bad, msg in [
        ("max copy shift 2", "unknown intervention 'shift'"),
        ("max copy window 8", "E = 8L was not probed"),
        ("max sort window 2", "no records with probes of task 'sort'"),
        ("median copy", "unknown kind"),
    ]:
        with pytest.raises(ValueError, match=msg):
            quote(records, bad)
    skeleton = "".join(f"<!-- generated:{b} -->\n<!-- /generated:{b} -->\n" for b in BLOCKS)
    page = render_page(skeleton + "<!--q max copy window 2-->?<!--/q-->\n", records)
    assert "<!--q max copy window 2-->0.70<!--/q-->" in page
    assert "| alibi | 2/2 | 1.00 | 0.10 | 0.40 [0.20, 0.60] | 0.70 [0.50, 0.90] |" in page  # recovery at 16
    assert "- left out, did not learn in distribution (exact match over 1..L): copy/t5 seed 0 lr 0.001 (0.500)" in page
    assert "sweep incomplete (the chosen rate is not known yet): 1 record: copy/rope (1 of 3 rates)" in page
    assert "`translation_invariant` (`shifted` changes none of their scores): alibi." in page
    assert render_page(page, records) == page  # a rendered page is a fixed point
    changed = page.replace("0.70 [0.50, 0.90]", "0.71 [0.50, 0.90]")
    assert render_page(changed, records) != changed
    with pytest.raises(ValueError, match="needs each of"):
        render_page(page.replace("<!-- generated:figures -->", ""), records)


def test_report_section_by_hand():
    import matplotlib.pyplot as plt

    assert mechanisms_report_section([_record("rope", 0, 3e-3, 1.0, 1.0, None)]) is None
    section = mechanisms_report_section(_records())
    try:
        assert "2 of 9 records count" in section["text"] and "1 sweep incomplete" in section["text"]
        captions = [t["caption"] for t in section["tables"]]
        assert len(captions) == 5 and "E=16 (2L)" in captions[0] and "attribution" in captions[2]
        assert "each hypothesis" in captions[3]
        assert [c for c, _ in section["figures"]] == ["copy: recovered share per intervention and attention entropy"]
    finally:
        for _, fig in section["figures"]:
            plt.close(fig)


def test_read_first_reads_complete_lines_only(tmp_path):
    with RECORDS.open(encoding="utf-8") as fh:
        line = fh.readline()  # a record of the current protocol (validate_record checks it)
    path = tmp_path / "r.jsonl"
    path.write_text(line + line + line[:20])
    assert len(read_first(path, 2)) == 2
    with pytest.raises(ValueError, match="line 3 is not complete"):
        read_first(path, 3)
    path.write_text(line)
    with pytest.raises(ValueError, match="holds 1 records, fewer than the 2"):
        read_first(path, 2)


def test_copy_and_reverse_sources_lie_where_the_page_says():
    """Copy: every answer symbol is the input symbol n positions before its query; reverse:
    answer symbol i is the one 2i - 1 positions before its query (query = target - 1)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for name, back in (("copy", lambda n, i: n), ("reverse", lambda n, i: 2 * i - 1)):
        task = SyntheticTask(name, 32)
        for n in (8, 16, 64):
            ex = task.sample(n, 16, gen)
            targets = ex.answer_mask[0].nonzero()[:, 0]  # [n]
            for i, t in enumerate(targets.tolist(), 1):
                assert torch.equal(ex.tokens[:, t - 1 - back(n, i)], ex.tokens[:, t]), (name, n, i)
    assert SyntheticTask("copy", 32).sequence_length(8) - 1 == 2 * 8 + 1  # W = T(L) = 2L + 1


def _unquoted_numbers(page: str) -> list[str]:
    """Decimal numbers and ``k/n`` fractions outside generated blocks, quotes, code and
    link targets."""
    text = BLOCK.sub("", page)
    text = QUOTE.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.findall(r"\d+\.\d+|\b\d+/\d+\b", text)


def test_prose_numbers_are_quotes():
    assert _unquoted_numbers("recovers 0.98 on 3/3 seeds") == ["0.98", "3/3"]
    assert _unquoted_numbers("<!--q max copy window 2-->0.70<!--/q-->, `0.1 ln s + 1`, at 8L, 2L + 1") == []


# -- the page, on the first N committed records ------------------------------------------------


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def records(page) -> list[dict]:
    found = COUNT.findall(page)
    assert len(found) == 1, "docs/mechanisms.md must state once how many records it is built from"
    return read_first(RECORDS, int(found[0]))  # fewer lines committed than the page states: fails here


def test_page_is_the_first_n_records(page, records):
    rendered = render_page(page, records)
    if rendered != page:
        diff = "\n".join(list(difflib.unified_diff(page.splitlines(), rendered.splitlines(), lineterm=""))[:40])
        pytest.fail(f"docs/mechanisms.md differs from its records (write_mechanisms_page regenerates it):\n{diff}")


def test_page_has_no_unquoted_number(page):
    assert _unquoted_numbers(page) == [], "a number in docs/mechanisms.md's prose is not a quote of the records"
    status = page[page.index("**Status.**") : page.index("## ")]
    from posenc.experiments.study import presets
    from posenc.pipeline.results_page import complete_tasks

    records = read_first(RECORDS, int(COUNT.findall(page)[0]))
    if set(complete_tasks(records)) != set(presets()["full"].tasks):  # the study is not complete: say so up front
        assert "still being trained" in status, "docs/mechanisms.md must say the study is incomplete"


def _counted_by_hand(records: list[dict]) -> list[dict]:
    """The counted records, recomputed: a pair counts once seed 0 has every rate of
    LR_GRID, then the sweep's chosen rate (``selected``) and exact match over 1..L >= 0.9
    at positions 0..s-1."""
    complete = {
        (r["task"], r["encoding"])
        for r in records
        if set(LR_GRID)
        <= {run_lr(x) for x in records if (x["task"], x["encoding"], x["seed"]) == (r["task"], r["encoding"], 0)}
    }
    kept = {r["run_id"] for r in selected([r for r in records if (r["task"], r["encoding"]) in complete])}
    # gated on the record's own metrics (positions 0..s-1, where the probes are scored)
    return [
        r
        for r in records
        if r["run_id"] in kept and ("exact_match" not in r["metrics"][0] or in_distribution(r) >= 0.9)
    ]


def test_quotes_recomputed_from_the_raw_probes(page, records):
    counted = _counted_by_hand(records)
    checked = 0
    for spec, value in QUOTE.findall(page):
        kind, *args = spec.split()
        if kind == "counted":
            assert value == str(len(counted))
        elif kind == "max":
            task, cond, factor = args
            by_enc: dict[str, list[float]] = {}
            for r in (r for r in counted if r["task"] == task):
                p = r["probes"]
                entry = next(x for x in p["lengths"] if x["length"] == int(factor) * p["train_length"])
                lm = "ppl" in p["reference"]
                # score s: exact match, or minus log perplexity on a corpus
                s = (lambda m: -math.log(m["ppl"])) if lm else (lambda m: m["exact_match"])
                drop = s(p["reference"]) - s(entry["none"])
                by_enc.setdefault(r["encoding"], [])
                if drop >= MIN_DROP["lm" if lm else "synthetic"]:
                    by_enc[r["encoding"]].append((s(entry[cond]) - s(entry["none"])) / drop)
            means = [statistics.fmean(v) for v in by_enc.values() if v]
            assert value == (f"{max(means):.2f}" if means else "no drop"), spec
        checked += 1
    assert checked >= 5


def test_copy_window_reach_in_the_counted_records(records):
    """The page's claim: on copy, the models' layers reach back at most k (W - 1)
    positions under the window, >= 2L in one layer, >= 4L in all, < 8L."""
    for r in counted_records(records, grid=LR_GRID)[0]:
        if r["task"] != "copy":
            continue
        k, w, L = r["config"]["model"]["num_layers"], r["probes"]["window"], r["train_length"]
        assert w - 1 >= 2 * L and k * (w - 1) >= 4 * L and k * (w - 1) < 8 * L, r["run_id"]
        assert 8 * L in [x["length"] for x in r["probes"]["lengths"]]


def test_figures_are_drawn_from_the_records(records):
    from PIL import Image

    counted, _ = counted_records(records, grid=LR_GRID)
    tasks = sorted({r["task"] for r in counted})
    assert page_blocks(records)["figures"].count("![") == len(tasks)
    for task in tasks:
        path = DOCS / "img" / f"mechanisms_{task}.png"
        assert path.is_file(), f"{path} is missing: write_mechanisms_page() draws it"
        description = Image.open(path).text.get("Description", "")
        assert description == f"posenc-mechanisms {mechanisms_digest(figure_data(counted, task))}", path


@pytest.mark.slow  # a whole report (~5 s)
def test_report_of_a_study_with_probes_has_the_section(tmp_path):
    from posenc import analysis
    from posenc.pipeline.report import write_report

    with RECORDS.open(encoding="utf-8") as fh:
        copy = [line for line in fh if json.loads(line)["task"] == "copy"]
    (tmp_path / "results.jsonl").write_text("".join(copy[:9]))  # three complete sweeps of the full preset's copy runs
    cfg = analysis.CardConfig(horizon=32, train_length=16, beyond_horizon=48)
    path = write_report(
        tmp_path / "r.html", study_dir=tmp_path, encodings=["none"], attention_steps=0, pretrained=False, config=cfg
    )
    html = path.read_text(encoding="utf-8")
    assert "Why encodings fail past L: mechanism probes" in html
    assert html.count("recovered by each intervention") == 3  # one recovery table per E: 2L, 4L, 8L
    assert "3 of 9 records count (left out: 6 not chosen)" in html


def test_the_page_shows_only_tasks_with_all_their_runs():
    """The status line quotes the counted records' tasks; each must have every run of the
    full preset in the records read, so a shown task's numbers do not change later."""
    from posenc.pipeline.results_page import complete_tasks

    page = PAGE.read_text()
    records = read_first(RECORDS, int(COUNT.findall(page)[0]))
    shown = quote(records, "tasks").split(", ")
    assert f"<!--q tasks-->{', '.join(shown)}<!--/q-->" in page
    missing = sorted(set(shown) - set(complete_tasks(records)))
    assert not missing, f"docs/mechanisms.md shows tasks whose runs are not all in: {missing}"
