"""docs/results.md quotes the committed study records, not numbers typed by hand.

The records behind the page are committed under docs/data/ (study_results.jsonl, and
the T5 experiment's t5_md64_results.jsonl). These tests recompute the page's generated
blocks and quotes from those records and fail on any difference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "results.md"
CURRENT = DOCS / "data" / "study_results.jsonl"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text()


def test_t5_experiment_is_the_study_runs_with_max_distance_64():
    """The T5 experiment's records are shakespeare's t5 runs of the full preset (each
    seed's config at its chosen rate) with ``max_distance`` 64 and nothing else changed,
    written from a clean tree; its documented config is seed 0's."""
    from posenc.experiments.config import config_from_dict, load_config, replace
    from posenc.experiments.summary import selected
    from posenc.pipeline.results_page import T5_EXPERIMENT, read_experiment

    study = {r["seed"]: r for r in selected(_records(CURRENT)) if r["task"] == "shakespeare" and r["encoding"] == "t5"}
    experiment = read_experiment(T5_EXPERIMENT)
    assert sorted(r["seed"] for r in experiment) == [0, 1, 2] == sorted(study)
    for r in experiment:
        want = replace(config_from_dict(study[r["seed"]]["config"]), model={"encoding_params": {"max_distance": 64}})
        assert config_from_dict(r["config"]) == want
        assert not r["git_commit"].endswith("+dirty")
    documented = load_config(DOCS / "configs" / "shakespeare_t5_max_distance_64.yaml")
    seed0 = config_from_dict(next(r for r in experiment if r["seed"] == 0)["config"])
    assert documented == replace(seed0, train={"threads": None})


def test_protocol_table_states_the_preset(page):
    """The protocol's sizes are the full preset's: test examples, lengths, steps, corpus layout."""
    from posenc.experiments.study import plan_phases, presets

    copy = plan_phases("full", tasks=["copy"], encodings=["rope"]).first[0]
    recall = plan_phases("full", tasks=["recall"], encodings=["rope"]).first[0]
    text = plan_phases("full", tasks=["shakespeare"], encodings=["rope"]).first[0]
    protocol = page[page.index("## Protocol") : page.index("## Commands")]
    held = text.task.held_out()
    assert f"{copy.task.eval_samples} fresh examples" in protocol
    inside = [n for n in copy.task.synthetic_lengths if copy.task.train_length < n <= 2 * copy.task.train_length]
    assert "at " + ", ".join(map(str, inside[:-1])) + f" and {inside[-1]} (inside (L, 2L])" in protocol
    assert f"{copy.train.steps:,} steps (recall {recall.train.steps:,})" in protocol
    assert f"{held.segments} held-out segments" in protocol and f"{held.test_scored:,} scored characters" in protocol
    assert f"({held.segments * held.test_scored:,} in all) after {held.test_context:,} characters" in protocol
    assert "E = " + ", ".join(map(str, text.task.lm_lengths)) in protocol
    assert f"L = {text.task.train_length} characters" in protocol and f"(L = {copy.task.train_length})" in protocol
    tasks = presets()["full"].tasks
    plans = [plan_phases("full", tasks=[t]) for t in tasks]
    variants = {c.encoding_label for p in plans for c in p.first}
    runs = sum(len(p.first) + len(p.later) for p in plans)
    assert f"({runs} runs: {len(variants)} encoding variants, {len(tasks)} tasks, 3 seeds" in page


# -- the section "Results", on the first N committed records of study_results.jsonl ---------


def _current_section(page: str) -> str:
    start = page.index("\n## Results\n")
    end = page.find("\n## ", start + 1)
    return page[start : end if end >= 0 else len(page)]


def test_current_section_is_the_first_n_records(page):
    import difflib

    from posenc.pipeline.mechanisms_page import read_first
    from posenc.pipeline.results_page import render_page

    found = re.findall(r"<!--q records-->(\d+)<!--/q-->", page)
    assert len(found) == 1, "docs/results.md must state once how many current records it is built from"
    rendered = render_page(page, read_first(CURRENT, int(found[0])))
    if rendered != page:
        diff = "\n".join(list(difflib.unified_diff(page.splitlines(), rendered.splitlines(), lineterm=""))[:40])
        pytest.fail(f"docs/results.md's current section differs from its records (write_results_page):\n{diff}")


def test_current_section_prose_has_no_unquoted_number(page):
    from posenc.pipeline.extension_page import BLOCK, QUOTE

    text = QUOTE.sub("", BLOCK.sub("", _current_section(page)))
    text = re.sub(r"`[^`]*`", "", re.sub(r"\]\([^)]*\)", "]", text))
    typed = re.findall(r"\d+\.\d{2,}|\b\d+/\d+\b|\b\d+ of \d+\b|\[\d", text)
    assert typed == [], f"a score or count in the current section is typed by hand: {typed}"


def test_a_chosen_quote_counts_the_sweep_table(page):
    from posenc.experiments.summary import sweep_table
    from posenc.pipeline.mechanisms_page import read_first
    from posenc.pipeline.results_page import complete_tasks, quote

    records = read_first(CURRENT, int(re.findall(r"<!--q records-->(\d+)<!--/q-->", page)[0]))
    cache: dict = {}
    for task in complete_tasks(records):
        rows = sweep_table([r for r in records if r["task"] == task]).rows
        counts = [quote(records, f"chosen {task} {where}", cache) for where in ("lowest", "highest", "inside")]
        assert sum(int(c.split()[0]) for c in counts) == len(rows), (task, counts)
        assert counts[1] == f"{sum(row[-1] == 'highest tried' for row in rows)} of {len(rows)}"
    with pytest.raises(ValueError, match="unknown kind"):
        quote(records, "chosen copy middle")
    with pytest.raises(ValueError, match="not shown"):
        quote([], "chosen copy lowest")


def test_a_learned_quote_counts_the_runs_of_one_seed(page):
    """``learned TASK SEED`` counts that seed's runs at the chosen rate (one per encoding)
    with exact match over 1..L at the bar, and the three seeds' counts add up to the
    interval table's "runs learned" column."""
    from posenc.experiments.summary import learned, selected
    from posenc.pipeline.mechanisms_page import read_first
    from posenc.pipeline.results_page import complete_tasks, quote

    records = read_first(CURRENT, int(re.findall(r"<!--q records-->(\d+)<!--/q-->", page)[0]))
    cache: dict = {}
    for task in complete_tasks(records):
        runs = [r for r in selected(records) if r["task"] == task]
        if "exact_match" not in runs[0]["metrics"][0]:
            continue
        by_seed = [quote(records, f"learned {task} {seed}", cache) for seed in (0, 1, 2)]
        for seed, text in enumerate(by_seed):
            mine = [r for r in runs if r["seed"] == seed]
            assert text == f"{sum(map(learned, mine))} of {len(mine)}", (task, seed)
        column = [quote(records, f"cell {task} {e} runs_learned", cache) for e in sorted({r["encoding"] for r in runs})]
        assert sum(int(c.split()[0]) for c in column) == sum(int(t.split()[0]) for t in by_seed), task
    with pytest.raises(ValueError, match="no run of seed"):
        quote(records, "learned copy 7", cache)
    with pytest.raises(ValueError, match="unknown kind"):
        quote(records, "learned copy first", cache)


def test_a_cell_quote_is_the_interval_table(page):
    from posenc.pipeline.results_page import quote

    with pytest.raises(ValueError, match="unknown kind"):
        quote([], "cells copy rope 16")
    with pytest.raises(ValueError, match="not shown"):
        quote([], "cell copy rope 16")


def test_figures_are_drawn_from_the_records(page):
    """Every shown task's figure is committed, linked from the page, and drawn from the
    records the page reads (``task_digest`` in its ``Description``); a synthetic figure
    draws only runs that learned."""
    from PIL import Image

    from posenc.experiments.summary import learned
    from posenc.pipeline.mechanisms_page import read_first
    from posenc.pipeline.results_page import complete_tasks, figure_path, figure_runs
    from posenc.viz.study import task_digest

    records = read_first(CURRENT, int(re.findall(r"<!--q records-->(\d+)<!--/q-->", page)[0]))
    tasks = complete_tasks(records)
    assert tasks
    for task in tasks:
        path = figure_path(DOCS / "img", task)
        assert f"](img/{path.name})" in page
        assert path.is_file(), f"{path} is missing: write_results_page() draws it"
        by_enc, metric = figure_runs(records, task)
        assert Image.open(path).text.get("Description") == f"posenc-study {task_digest(by_enc, metric)}", path
        if metric == "exact_match":
            assert all(learned(r) for recs in by_enc.values() for r in recs)


def test_a_table_quote_is_a_cell_of_the_table():
    from posenc.experiments.published import press_table
    from posenc.pipeline.mechanisms_page import read_first
    from posenc.pipeline.results_page import quote

    records = read_first(CURRENT, 630)  # copy, reverse, duplicate, sort, count, shakespeare
    shown = [r for r in records if r["task"] == "shakespeare"]
    (table,) = press_table(shown)
    row = next(r for r in table.rows if r[0] == "rope")
    assert quote(records, "table press shakespeare rope ours_4L") == row[table.columns.index("ours 4L")]
    with pytest.raises(ValueError, match="not shown"):  # no stdlib run in the first 630 lines
        quote(records, "table press stdlib rope ours_4L")
    with pytest.raises(ValueError, match="no such row"):
        quote(records, "table kazemnejad integer mean_rank")
    with pytest.raises(ValueError, match="no column"):
        quote(records, "table press shakespeare rope ours_3L")
    with pytest.raises(ValueError, match="use table"):
        quote(records, "table press rope ours_4L")


def test_read_first_reads_complete_lines_only(tmp_path):
    """``read_first(path, None)`` reads every complete line (a line still being written is
    left out); a count past the complete lines, or not an int, is an error."""
    from posenc.pipeline.mechanisms_page import read_first

    lines = CURRENT.read_text().splitlines(keepends=True)[:3]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(lines) + lines[0][:20])  # a fourth line, not complete yet
    assert [r["run_id"] for r in read_first(path, None)] == [json.loads(x)["run_id"] for x in lines]
    assert len(read_first(path, 2)) == 2
    with pytest.raises(ValueError, match="not complete yet"):
        read_first(path, 4)
    with pytest.raises(ValueError, match="count must be an int"):
        read_first(path, "3")
