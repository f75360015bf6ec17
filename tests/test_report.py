"""Study results -> tables; report inputs validated (the browser test checks rendering)."""

from __future__ import annotations

import json

import pytest

from posenc import analysis
from posenc.experiments.results import read_results
from posenc.experiments.summary import metric_tables
from posenc.pipeline.report import study_results, write_report


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
    import plotly.offline

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
    # card curves, a study curve per metric (exact match, token accuracy), the extra curve
    assert html.count('class="plotly-graph-div"') == 4 + 2 + 1
    assert html.count("Plotly.newPlot") == 7
    # plotly.js itself is embedded exactly once (offline, no CDN).
    assert html.count(plotly.offline.get_plotlyjs()[:300]) == 1 and "<script src" not in html
