"""Study results -> tables and conclusions; report inputs validated; the default report's
size, single plotly bundle and family-appropriate figures (the browser test checks
rendering)."""

from __future__ import annotations

import json

import pytest
import torch
from markupsafe import escape as html_escape

from posenc import analysis
from posenc.experiments.results import read_results
from posenc.experiments.summary import metric_tables
from posenc.pipeline.conclusions import study_conclusions
from posenc.pipeline.report import study_results, write_report
from posenc.viz import figures
from posenc.viz.figures import TrainedAttention
from posenc.viz.items import Items
from posenc.viz.story import attention_item, story_kinds


def _run(task, enc, seed, metrics, train_length=16):
    return {
        "run_id": f"{task}-{enc}-{seed}",
        "task": task,
        "encoding": enc,
        "seed": seed,
        "train_length": train_length,
        "config": {},
        "git_commit": "abc",
        "torch_version": "2.13.0",
        "wall_time_s": 1.0,
        "metrics": metrics,
    }


#: One valid metrics list (results.jsonl's schema: every entry has all the keys of its kind).
GOOD = [{"length": 1, "exact_match": 1.0, "token_accuracy": 1.0}]


def _write(tmp_path, runs):
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    return tmp_path


def test_summarize_means_and_stds_over_seeds(tmp_path):
    runs = [
        _run(
            "copy",
            "rope",
            0,
            [
                {"length": 16, "exact_match": 1.0, "token_accuracy": 1.0},
                {"length": 32, "exact_match": 0.2, "token_accuracy": 0.6},
            ],
        ),
        _run(
            "copy",
            "rope",
            1,
            [
                {"length": 16, "exact_match": 0.5, "token_accuracy": 0.9},
                {"length": 32, "exact_match": 0.4, "token_accuracy": 0.7},
            ],
        ),
        _run("copy", "alibi", 0, [{"length": 16, "exact_match": 0.75, "token_accuracy": 0.8}]),
        _run("charlm", "rope", 0, [{"length": 64, "ppl": 3.0, "ppl_sliding": 2.5}], train_length=64),
    ]
    tables = {(t.task, t.metric): t for t in metric_tables(read_results(_write(tmp_path, runs)))}
    assert list(tables) == [
        ("charlm", "ppl"),
        ("charlm", "ppl_sliding"),
        ("copy", "exact_match"),
        ("copy", "token_accuracy"),
    ]
    copy = tables["copy", "exact_match"]
    assert copy.metric == "exact_match" and copy.higher_is_better and copy.lengths == [16, 32]
    rows = {row[0]: cells for row, cells in zip(copy.rows, copy.cells, strict=True)}
    # rope at 16: mean(1.0, 0.5) = 0.75, sample std = sqrt(((0.25)^2 * 2) / 1) = 0.353553...
    assert rows["rope"][0][0] == pytest.approx(0.75) and rows["rope"][0][1] == pytest.approx(0.5**0.5 / 2)
    assert rows["rope"][1][0] == pytest.approx(0.3) and rows["rope"][1][2] == 2
    assert rows["alibi"] == [(0.75, 0.0, 1), None]  # alibi was not evaluated at 32
    assert tables["copy", "token_accuracy"].cells[1][0] == (
        pytest.approx(0.95),
        pytest.approx(0.1 / 2**0.5),
        2,
    )  # std of (1.0, 0.9)
    lm = tables["charlm", "ppl"]
    assert lm.metric == "ppl" and not lm.higher_is_better and lm.rows == [["rope", "64", "3"]]
    assert lm.cells == [[(3.0, 0.0, 1)]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "results.jsonl' line 2 is corrupt"),
        ("[1, 2]", "results.jsonl' line 2 is not a JSON object"),
        (json.dumps({"run_id": "x"}), "line 2 is missing 'task'"),
        (json.dumps({**_run("t", "e", 0, GOOD), "seed": "zero"}), "line 2: 'seed' must be int"),
        (json.dumps(_run("t", "e", 0, [{"len": 3}])), "line 2: every metrics entry needs an int 'length'"),
    ],
)
def test_bad_results_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "results.jsonl").write_text(json.dumps(_run("t", "e", 0, GOOD)) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_results(tmp_path)


@pytest.mark.slow
def test_missing_results_and_bad_inputs(tmp_path):
    assert read_results(tmp_path) == []  # a run folder where no run has finished yet
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        study_results(tmp_path)  # the report needs them
    fast = dict(
        attention_steps=0, pretrained=False, config=analysis.CardConfig(horizon=32, train_length=16, beyond_horizon=48)
    )
    with pytest.raises(ValueError, match="unknown encoding"):
        write_report(tmp_path / "r.html", encodings=["nope"], **fast)
    with pytest.raises(TypeError, match=r"extra_sections\[0\]"):
        write_report(tmp_path / "r.html", encodings=["none"], extra_sections=[{"text": "no title"}], **fast)
    with pytest.raises(ValueError, match="unknown keys"):
        write_report(tmp_path / "r.html", encodings=["none"], extra_sections=[{"title": "t", "html": "<b>"}], **fast)


@pytest.mark.slow
def test_report_has_study_tables_and_extra_sections(tmp_path):
    import plotly.graph_objects as go

    (tmp_path / "s").mkdir()
    runs = [
        _run("copy", "sinusoidal", 0, [{"length": 16, "exact_match": 0.875, "token_accuracy": 0.9}]),
        _run("copy", "sinusoidal", 1, [{"length": 16, "exact_match": 0.625, "token_accuracy": 0.9}]),
    ]
    study = _write(tmp_path / "s", runs)
    extra = {
        "title": "Context extension",
        "text": "PI vs YaRN",
        "tables": [{"caption": "ppl", "columns": ["rule", "ppl"], "rows": [["yarn", "3.1"]]}],
        "plotly": [("curve", go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))],
    }
    path = write_report(
        tmp_path / "r.html",
        study_dir=study,
        encodings=["sinusoidal"],
        extra_sections=[extra],
        attention_steps=0,
        pretrained=False,
        config=analysis.CardConfig(horizon=32, train_length=16, beyond_horizon=48),
    )
    html = path.read_text()
    assert "<td>0.75 ± 0.18</td>" in html  # mean(0.875, 0.625), std 0.1768
    assert "Context extension" in html and "PI vs YaRN" in html and "<td>yarn</td>" in html
    # Every curve is a graph div with its JSON; the study draws one per metric, the extra its own.
    n_plots = html.count('class="plotly-graph-div"')
    assert html.count('class="plotly-data"') == n_plots
    assert html.count('"text":"copy: exact_match against evaluation length"') == 1
    assert html.count('"text":"copy: token_accuracy against evaluation length"') == 1
    assert '"curve"' not in html and ">curve</figcaption>" in html
    # The study's conclusions, in sentences with their numbers (mean over the two seeds).
    assert "copy (trained at L = 16, 2 seeds): exact match over lengths 1..L: sinusoidal 0.75" in html
    _one_offline_bundle(html)


def _one_offline_bundle(html):
    """plotly.js is embedded exactly once, gzipped (no CDN, no second copy)."""
    import base64
    import gzip
    import re

    import plotly.offline

    assert html.count('id="plotly-bundle"') == 1 and "<script src" not in html
    assert html.count(plotly.offline.get_plotlyjs()[:300]) == 0  # not also raw
    bundle = re.search(r'<script type="application/octet-stream" id="plotly-bundle"[^>]*>([^<]+)</script>', html)
    assert gzip.decompress(base64.b64decode(bundle.group(1))).decode() == plotly.offline.get_plotlyjs()
    assert not re.search(r"(src|href)=\"https?://", html)


def test_conclusions_name_the_numbers():
    runs = [
        _run(
            "copy", "rope", s, [{"length": n, "exact_match": e, "token_accuracy": e} for n, e in ((8, 1.0), (16, 0.5))]
        )
        for s in (0, 1)
    ] + [_run("copy", "alibi", 0, [{"length": 8, "exact_match": 0.5, "token_accuracy": 0.5}])]
    for r in runs:
        r["train_length"] = 8
    text = " ".join(study_conclusions(runs))
    assert "copy (trained at L = 8, 2 seeds): exact match over lengths 1..L: rope 1.00 best, alibi 0.50 worst" in text
    assert "at 16 (2L): rope 0.50." in text  # only rope reached 16: no ranking of one
    assert "1 run(s) did not learn in distribution" in text and "alibi on copy (seed 0)" in text


def _maps(encoding, loss):
    weights = torch.rand(2, 4, 8, 8).softmax(-1)
    return TrainedAttention(encoding=encoding, steps=300, loss=loss, weights=weights)


def test_attention_maps_only_of_models_that_learned():
    items = Items()
    attention_item(items, _maps("rope", 0.01))
    attention_item(items, _maps("alibi", 2.8))
    attention_item(items, _maps("none", 3.1), blindness=True)
    rope, alibi, none = items.items
    assert rope["type"] == "figure" and "loss 0.01 < 0.5 (learned)" in rope["caption"]
    assert alibi["type"] == "note" and "did not learn" in alibi["text"] and "loss 2.8 ≥ 0.5" in alibi["text"]
    # The model without positions is drawn (it shows blindness), labelled as not learned.
    assert none["type"] == "figure" and "did not learn" in none["caption"]


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("none", []),  # nothing but the blindness figures of step 1
        ("alibi", ["bias"]),  # no similarity square, no bucket panel for a bias that never saturates
        ("kerple", ["bias"]),
        ("t5", ["buckets", "bias"]),  # saturates: its buckets
        ("shaw", ["buckets"]),
        ("sinusoidal", ["past", "similarity"]),
        ("rope", ["rotation", "decay"]),
        ("binary", ["heatmap"]),
    ],
)
def test_only_the_figures_of_the_encodings_signal(name, kinds):
    cfg = analysis.CardConfig(horizon=128, train_length=64, beyond_horizon=256)
    card = analysis.report_card(name, cfg)
    assert story_kinds(card) == kinds
    signal = figures.signal_of(card.kind, card.beyond.saturation)
    assert all(figures.applies(k, signal) for k in kinds)
    if card.kind == "bias":
        assert not figures.applies("similarity", signal)


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    """The report `posenc report` writes by default (every encoding, the tiny models, MiniLM)."""
    path = tmp_path_factory.mktemp("default") / "report.html"
    return write_report(path).read_text(encoding="utf-8")


@pytest.mark.slow  # the default report: ~30-60 s on 2 cores
def test_default_report_is_small_offline_and_family_appropriate(default_report):
    import re

    html = default_report
    assert len(html.encode()) < 4 * 1024 * 1024, len(html.encode())
    _one_offline_bundle(html)
    assert html.count('id="plotly-bundle"') == 1
    drawn = {}
    for name, kind in re.findall(r'data-figure="([^":]+):(\w+)"', html):
        drawn.setdefault(name, []).append(kind)
    for bias in ("alibi", "kerple", "fire", "sandwich", "t5", "shaw", "cope"):
        assert "similarity" not in drawn.get(bias, []) and "heatmap" not in drawn.get(bias, []), (bias, drawn)
    for never_saturates in ("alibi", "kerple", "fire", "sandwich"):
        assert drawn[never_saturates] == ["bias"]
    assert drawn["t5"] == ["buckets", "bias", "attention"]
    assert drawn["none"] == ["blindness", "attention"]  # `none` shows only its blindness
    assert drawn["rope"] == ["rotation", "decay", "attention"]
    assert "attention" not in drawn["alibi"]  # its tiny model did not learn: a note instead
    # float rounding only: the deviation of a blind model depends on the reduction order of the
    # matmuls, which depends on the thread count (0 with one thread, ~1e-8 with two)
    (blind,) = set(re.findall(r"none without a mask: the same outputs \(deviation ([^)]*)\)", html))
    assert float(blind) < 1e-6, blind
    assert "sinusoidal without a mask: different outputs" in html
    # Attention maps: each caption states the bar, and a model below it is not drawn.
    for caption in re.findall(r"tiny causal LM \(2 layers × 4 heads\)[^<]*", html):
        assert "(learned)" in caption or "did not learn" in caption
    headings = re.findall(r"<h2>([^<]+)</h2>", html)
    assert [h.split(" · ")[0] for h in headings] == [str(i) for i in range(1, 9)]
    # The report card's legend: every column explained under the table.
    for column, meaning in analysis.CARD_COLUMNS.items():
        assert f"<dt>{html_escape(column)}</dt><dd>{html_escape(meaning)}</dd>" in html


def test_the_sentence_test_measures_order_blindness():
    from posenc.analysis.order import sentence_order

    blind = sentence_order("none")  # "I go home" vs "home go I", no mask
    assert blind.same and blind.deviation < 1e-6 and blind.permuted_sentence == "home go I"
    assert not sentence_order("none", causal=True).same  # a causal mask leaks order
    assert not sentence_order("sinusoidal").same
    with pytest.raises(ValueError, match="permutation"):
        sentence_order("none", order=(0, 0, 1))


def test_log_axes_tick_only_labelled_values():
    from posenc.viz.curves import Styles, log_axis, log_ticks

    assert log_ticks(0.02, 300) == [0.1, 1, 10, 100]  # decades when they span several
    axis = log_axis([3.1, 4.0, 5.9], "ppl")  # within one decade: finer ticks, every one labelled
    assert (
        axis["type"] == "log" and axis["tickvals"] == [3, 4, 5, 6, 7] and axis["ticktext"] == ["3", "4", "5", "6", "7"]
    )
    styles = Styles()
    seen = {tuple(styles(f"enc{i}").items()) for i in range(40)}
    assert len(seen) == 40  # 40 lines, each its own colour and dash
