"""docs/data/study_results.jsonl: the full preset's records under the current protocol.

The file grows as the re-run's runs finish. Every record in it must be one of the full
preset's planned runs (phase 1: the learning-rate sweep of seed 0; phase 2: the other
seeds at the rate chosen from phase 1), written from a committed, unmodified tree, with
every key of the current protocol: counts behind every rate, the validation score that
chose its learning rate, the mechanism probes, and the corpus identity for text.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from posenc.experiments.results import read_results, validate_record
from posenc.experiments.study import plan_phases
from posenc.experiments.summary import LEARNED_BAR, learned, selected
from posenc.pipeline.results_page import complete_tasks

RECORDS = Path(__file__).resolve().parents[1] / "docs" / "data" / "study_results.jsonl"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    if not RECORDS.is_file():
        pytest.skip("no record of the current protocol is committed yet")
    folder = tmp_path_factory.mktemp("study")
    shutil.copy(RECORDS, folder / "results.jsonl")
    return read_results(folder)  # every line checked by validate_record


def test_records_are_the_full_preset_from_clean_commits(records):
    ids = [r["run_id"] for r in records]
    assert len(ids) == len(set(ids))
    planned: set[str] = set()
    for task in {r["task"] for r in records}:  # the phases of each task's runs
        plan = plan_phases("full", tasks=[task])
        planned |= {c.run_id for c in plan.first}
        if all(c.run_id in ids for c in plan.first):  # its sweep is complete: phase 2's ids are known
            planned |= {c.run_id for c in plan.second_phase(records)}
    assert set(ids) <= planned, sorted(set(ids) - planned)[:5]
    for r in records:
        assert r["git_commit"] != "unknown" and not r["git_commit"].endswith("+dirty"), r["run_id"]
        assert r["torch_version"] and r["cpu_capability"] and r["train_step"] in ("fast", "reference")


def test_records_carry_the_current_protocol(records):
    for r in records:
        assert {"validation", "probes"} <= set(r), r["run_id"]
        lengths = [m["length"] for m in r["metrics"]]
        L = r["train_length"]
        if "exact_match" in r["metrics"][0]:
            assert sum(L < n < 2 * L for n in lengths) >= 3 and 2 * L in lengths
            assert all(m["samples"] >= 256 for m in r["metrics"])
        else:
            assert r["corpus"]["test_tokens"] >= 65536 and r["corpus"]["sha256"] and r["corpus"]["python_version"]
        if r["config"]["train"]["randomized_positions"]:
            assert "metrics_random" in r


def test_every_complete_synthetic_task_is_learned_by_three_encodings(records):
    """Each synthetic task is solvable at the study's size: at least three encodings learn
    it in distribution (exact match over 1..L at least LEARNED_BAR) on every seed at the
    chosen learning rate, so its ranks compare more than one or two encodings."""
    for task in complete_tasks(records):
        runs = [r for r in selected(records) if r["task"] == task]
        if "exact_match" not in runs[0]["metrics"][0]:
            continue
        seeds_learned: dict[str, list[bool]] = defaultdict(list)
        for r in runs:
            seeds_learned[r["encoding"]].append(learned(r))
        solid = sorted(e for e, v in seeds_learned.items() if all(v))
        assert len(solid) >= 3, f"{task}: only {solid} learned it (>= {LEARNED_BAR}) on every seed"


def test_a_changed_count_is_caught(records):
    bad = json.loads(json.dumps(records[0]))
    key = "exact_hits" if "exact_hits" in bad["metrics"][0] else "nll_segments"
    if key == "exact_hits":
        bad["metrics"][0]["exact_hits"] += 1 if bad["metrics"][0]["exact_hits"] < bad["metrics"][0]["samples"] else -1
    else:
        bad["metrics"][0]["nll_segments"][0] += 1.0
    with pytest.raises(ValueError):
        validate_record(bad)
