"""posenc.experiments.compare: the config check of a leaderboard (differing keys named,
baselines of another preset refused, uncovered tasks/seeds refused), the merge and the
standings, on records made from the plan's own configs (no training here; the commands
end to end are in tests/test_plugin_pipeline.py)."""

from __future__ import annotations

import json

import pytest

from posenc.experiments.compare import config_diff, merge, plan_compare, read_baselines, standings
from posenc.experiments.config import replace
from posenc.experiments.study import plan_study


def _record(cfg, score: float) -> dict:
    L = cfg.task.train_length
    metrics = [
        {"length": n, "exact_match": score, "token_accuracy": score} for n in [*range(1, L + 1), 2 * L, 4 * L, 8 * L]
    ]
    return {
        "run_id": cfg.run_id,
        "task": cfg.task.label,
        "encoding": cfg.encoding_label,
        "seed": cfg.train.seed,
        "train_length": L,
        "config": cfg.to_dict(),
        "git_commit": "test",
        "torch_version": "test",
        "wall_time_s": 1.0,
        "metrics": metrics,
    }


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _baselines(tmp_path, **changes):
    configs, _ = plan_study("smoke", encodings=["sinusoidal", "none"], seeds=[0, 1])
    if changes:
        configs = [replace(c, **changes) for c in configs]
    return _write(tmp_path / "results.jsonl", [_record(c, 0.5 if "none" in c.run_id else 0.25) for c in configs])


def test_config_diff_ignores_the_encoding_and_threads_only():
    (a,), _ = plan_study("smoke", encodings=["alibi"])
    b = replace(a, model={"encoding": "rope"}, train={"threads": 7, "randomized_positions": True, "steps": 3})
    assert config_diff(a.to_dict(), b.to_dict()) == [("train.steps", 20, 3)]


def test_plan_compare_keeps_matching_baselines_and_plans_only_the_new_encoding(tmp_path):
    path = _baselines(tmp_path)
    c = plan_compare("alibi", "smoke", baselines=path, seeds=[0, 1])
    assert [cfg.encoding_label for cfg in c.configs] == ["alibi", "alibi"]
    assert len(c.baselines) == 4 and c.outside == 0 and c.replaced == 0
    only_seed_0 = plan_compare("alibi", "smoke", baselines=path)  # the preset's seeds: 0
    assert len(only_seed_0.baselines) == 2 and only_seed_0.outside == 2
    again = plan_compare("none", "smoke", baselines=path, seeds=[0, 1])  # its own records are trained again
    assert again.replaced == 2 and {r["encoding"] for r in again.baselines} == {"sinusoidal"}


def test_baselines_with_another_config_are_refused_naming_the_keys(tmp_path):
    path = _baselines(tmp_path, train={"steps": 10}, model={"dim": 32})
    with pytest.raises(ValueError, match=r"differing keys: model\.dim, train\.steps") as err:
        plan_compare("alibi", "smoke", baselines=path)
    assert "train.steps 10 (baseline) vs 20 (alibi)" in str(err.value) and "not be fair" in str(err.value)
    with pytest.raises(ValueError, match="differing keys: .*task.train_length"):  # another preset's baselines
        plan_compare("alibi", "quick", baselines=_baselines(tmp_path), tasks=["copy"])


def test_tasks_or_seeds_without_baselines_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no baseline records .* for copy seed 5: .*\(copy seed 0, copy seed 1\)"):
        plan_compare("alibi", "smoke", baselines=_baselines(tmp_path), seeds=[0, 5])
    with pytest.raises(FileNotFoundError, match="no baseline records at"):
        plan_compare("alibi", "smoke", baselines=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is corrupt"):
        read_baselines(tmp_path / "bad.jsonl")


def test_merge_and_standings_rank_the_new_encoding(tmp_path):
    c = plan_compare("alibi", "smoke", baselines=_baselines(tmp_path), seeds=[0, 1])
    merged = merge(c, [_record(cfg, 0.4) for cfg in c.configs])
    assert len(merged) == 6
    table = standings("alibi", merged)
    assert table.columns == ["task", "criterion", "alibi", "rank", "best"]
    assert [row[:4] for row in table.rows] == [
        ["copy", "exact match 1..3", "0.400 ± 0.000", "2 of 3"],
        ["copy", "token accuracy (3, 6]", "0.400 ± 0.000", "2 of 3"],
    ]
    assert table.rows[0][4] == "none 0.500 ± 0.000"
    with pytest.raises(ValueError, match="no record of the runs"):
        merge(c, [])


def test_the_committed_full_records_pass_the_check_for_a_new_encoding():
    """docs/data/full_results.jsonl was trained with the current full preset: ranking a
    built-in against it plans its 24 runs and keeps the other encodings' 480 records."""
    c = plan_compare("alibi", "full")
    assert len(c.configs) == 24 and c.replaced == 24 and len(c.baselines) == 480
