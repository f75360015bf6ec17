"""docs/results.md quotes the committed study records, not numbers typed by hand.

The records behind the page are committed under docs/data/ (a run folder is not
tracked by git, and one was lost once). These tests recompute the page's generated
tables and the published-findings rows from those records and look for them in the page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posenc.experiments.published import kazemnejad_ranks, press_table, randpos_lm_table
from posenc.experiments.summary import Cell, ratio, tables, to_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "results.md"
FULL = DOCS / "data" / "full_results.jsonl"
T5_MD64 = DOCS / "data" / "t5_md64_results.jsonl"
LEARNED_TASKS = ("copy", "duplicate", "reverse", "sort")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return _records(FULL)


def test_records_are_unique_runs(records):
    ids = [r["run_id"] for r in records]
    assert len(ids) == len(set(ids))
    assert {r["torch_version"] for r in records} == {"2.13.0+cpu"}


def test_page_states_the_records_from_modified_trees(page, records):
    dirty = sum(r["git_commit"].endswith("+dirty") for r in records)
    assert f"| {dirty} of the {len(records)} records written from a modified tree" in page


def test_page_states_the_number_of_runs(page, records):
    assert f"**{len(records)} of the full preset's 504 runs**" in page
    assert "{{" not in page, "a placeholder was left in docs/results.md"


def test_generated_tables_are_the_records(page, records):
    block = to_markdown(tables(records))
    assert block in page, "docs/results.md's tables differ from posenc study --summarize-only on docs/data"


def test_press_rows_are_the_records(page, records):
    rows = [r for t in press_table(records) for r in t.rows]
    assert len(rows) == 8  # 4 encodings x (shakespeare, stdlib)
    for row in rows:
        assert "| " + " | ".join(row) + " |" in page


def test_kazemnejad_rows_are_the_records(page, records):
    all_tasks = kazemnejad_ranks(records)
    learned = kazemnejad_ranks([r for r in records if r["task"] in LEARNED_TASKS])
    # page columns: encoding, paper rank, mean rank (6 tasks), per-seed (6), mean (4), per-seed (4),
    # then the tasks each was ranked on (only runs that learned a task in distribution are ranked)
    by_enc = {row[0]: row for row in learned.rows}
    for row in all_tasks.rows:
        enc, paper, mean6, seed6, n6 = row[:5]
        mean4, seed4, n4 = by_enc[enc][2:5]
        assert f"| {enc} | {paper} | {mean6} | {seed6} | {mean4} | {seed4} | {n6} | {n4} |" in page


def test_ranks_on_the_page_leave_out_the_runs_that_did_not_learn(records):
    """No run below the in-distribution bar reaches a rank: NoPE did not learn reverse on
    any seed, so it is ranked on fewer tasks than ALiBi, and recall (learned by nobody)
    ranks nobody."""
    from posenc.experiments.summary import LEARNED_BAR, in_distribution, mean_ranks

    nope_reverse = [in_distribution(r) for r in records if r["encoding"] == "none" and r["task"] == "reverse"]
    assert len(nope_reverse) == 3 and max(nope_reverse) < LEARNED_BAR
    rows = {row[0]: row for row in kazemnejad_ranks(records).rows}
    assert rows["none"][4] == "3" and rows["alibi"][4] == "5"
    table = mean_ranks(records)
    recall = table.columns.index("recall token_accuracy (L, 2L]")
    assert all(row[recall].startswith("did not learn (") for row in table.rows)


def test_randpos_on_text_rows_are_the_records(page, records):
    table = randpos_lm_table(records)
    assert table is not None and len(table.rows) == 8  # 4 encodings x (shakespeare, stdlib)
    for row in table.rows:
        assert "| " + " | ".join(row) + " |" in page


def test_t5_max_distance_row_is_the_records(page):
    recs = _records(T5_MD64)
    assert sorted(r["seed"] for r in recs) == [0, 1, 2]
    assert {r["config"]["model"]["encoding_params"]["max_distance"] for r in recs} == {64}
    at_l = Cell.of([{m["length"]: m["ppl"] for m in r["metrics"]}[64] for r in recs]).fmt(2)
    ratios = [Cell.of([ratio(r, f * 64) for r in recs]).fmt(2) for f in (2, 4, 8, 16)]
    row = re.escape("| `max_distance = 64` | " + " | ".join([at_l, *ratios]) + " |")
    assert re.search(row, page)


# -- the current protocol's section, on the first N committed records of study_results.jsonl ---------

CURRENT = DOCS / "data" / "study_results.jsonl"


def _current_section(page: str) -> str:
    start = page.index("## Current protocol")
    return page[start : page.index("\n## ", start + 1)]


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


def test_a_cell_quote_is_the_interval_table(page):
    from posenc.pipeline.results_page import quote

    with pytest.raises(ValueError, match="unknown kind"):
        quote([], "cells copy rope 16")
    with pytest.raises(ValueError, match="not shown"):
        quote([], "cell copy rope 16")
