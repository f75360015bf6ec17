"""Study results -> tables; report inputs validated (the browser test checks rendering)."""

from __future__ import annotations

import json

import pytest

from posenc import analysis as A
from posenc.viz.report import write_report
from posenc.viz.study_tables import load_results, summarize


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


def _write(tmp_path, runs):
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    return tmp_path


def test_summarize_means_and_stds_over_seeds(tmp_path):
    runs = [
        _run(
            "copy",
            "rope",
            0,
            [{"length": 16, "exact_match": 1.0, "token_accuracy": 1.0}, {"length": 32, "exact_match": 0.2}],
        ),
        _run(
            "copy",
            "rope",
            1,
            [{"length": 16, "exact_match": 0.5, "token_accuracy": 0.9}, {"length": 32, "exact_match": 0.4}],
        ),
        _run("copy", "alibi", 0, [{"length": 16, "exact_match": 0.75}]),
        _run("charlm", "rope", 0, [{"length": 64, "ppl": 3.0, "ppl_sliding": 2.5}], train_length=64),
    ]
    tables = {(t.task, t.metric): t for t in summarize(load_results(_write(tmp_path, runs)))}
    assert list(tables) == [
        ("charlm", "ppl"),
        ("charlm", "ppl_sliding"),
        ("copy", "exact_match"),
        ("copy", "token_accuracy"),
    ]
    copy = tables["copy", "exact_match"]
    assert copy.metric == "exact_match" and copy.higher_is_better and copy.lengths == [16, 32]
    rows = {enc: cells for enc, _, cells in copy.rows}
    # rope at 16: mean(1.0, 0.5) = 0.75, sample std = sqrt(((0.25)^2 * 2) / 1) = 0.353553...
    assert rows["rope"][0][0] == pytest.approx(0.75) and rows["rope"][0][1] == pytest.approx(0.5**0.5 / 2)
    assert rows["rope"][1][0] == pytest.approx(0.3) and rows["rope"][1][2] == 2
    assert rows["alibi"] == [(0.75, 0.0, 1), None]  # alibi was not evaluated at 32
    assert tables["copy", "token_accuracy"].rows[1][2][0] == (
        pytest.approx(0.95),
        pytest.approx(0.1 / 2**0.5),
        2,
    )  # std of (1.0, 0.9)
    lm = tables["charlm", "ppl"]
    assert lm.metric == "ppl" and not lm.higher_is_better and lm.rows == [("rope", 64, [(3.0, 0.0, 1)])]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "results.jsonl:2: not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"run_id": "x"}), "missing 'task'"),
        (json.dumps({**_run("t", "e", 0, []), "seed": "zero"}), "'seed' must be int"),
        (json.dumps(_run("t", "e", 0, [{"len": 3}])), "int 'length'"),
    ],
)
def test_bad_results_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "results.jsonl").write_text(json.dumps(_run("t", "e", 0, [])) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_results(tmp_path)


def test_missing_results_and_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        load_results(tmp_path)
    fast = dict(
        attention_steps=0, pretrained=False, config=A.CardConfig(horizon=32, train_length=16, beyond_horizon=48)
    )
    with pytest.raises(ValueError, match="unknown encoding"):
        write_report(tmp_path / "r.html", encodings=["nope"], **fast)
    with pytest.raises(TypeError, match=r"extra_sections\[0\]"):
        write_report(tmp_path / "r.html", encodings=["none"], extra_sections=[{"text": "no title"}], **fast)
    with pytest.raises(ValueError, match="unknown keys"):
        write_report(tmp_path / "r.html", encodings=["none"], extra_sections=[{"title": "t", "html": "<b>"}], **fast)


def test_report_has_study_tables_and_extra_sections(tmp_path):
    import plotly.graph_objects as go
    import plotly.offline

    (tmp_path / "s").mkdir()
    runs = [
        _run("copy", "sinusoidal", 0, [{"length": 16, "exact_match": 0.875}]),
        _run("copy", "sinusoidal", 1, [{"length": 16, "exact_match": 0.625}]),
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
        config=A.CardConfig(horizon=32, train_length=16, beyond_horizon=48),
    )
    html = path.read_text()
    assert "<td>0.75 ± 0.18</td>" in html  # mean(0.875, 0.625), std 0.1768
    assert "Context extension" in html and "PI vs YaRN" in html and "<td>yarn</td>" in html
    assert html.count('class="plotly-graph-div"') == 4 + 1 + 1  # card curves, study curve, extra curve
    assert html.count("Plotly.newPlot") == 6
    # plotly.js itself is embedded exactly once (offline, no CDN).
    assert html.count(plotly.offline.get_plotlyjs()[:300]) == 1 and "<script src" not in html
