"""posenc.experiments.compare: the config check of a leaderboard (differing keys named,
baselines of another preset refused, uncovered tasks/seeds refused), the merge and the
standings, on records made from the plan's own configs (no training here; the commands
end to end are in tests/test_plugin_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posenc.experiments.compare import (
    config_diff,
    default_baselines,
    merge,
    plan_compare,
    read_baselines,
    standings,
)
from posenc.experiments.config import replace
from posenc.experiments.study import plan_phases, plan_study

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data"


def _record(cfg, score: float, inside: float = 1.0, validation: float | None = None) -> dict:
    """A record of ``cfg``: exact match and token accuracy ``inside`` at lengths 1..L and
    ``score`` past L (and an in-distribution validation score when given)."""
    L = cfg.task.train_length
    metrics = [
        {"length": n, "exact_match": v, "token_accuracy": v}
        for n in [*range(1, L + 1), 2 * L, 4 * L, 8 * L]
        for v in [inside if n <= L else score]
    ]
    extra = {} if validation is None else {"validation": {"metric": "exact_match", "value": validation, "size": 8}}
    for v in extra.values():
        v["higher_is_better"] = True
    return extra | {
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
    # a swept study's rates: a baseline's rate within the grid is its own sweep's choice
    c = replace(a, train={"lr": 0.01})
    assert config_diff(a.to_dict(), c.to_dict()) == [("train.lr", 0.003, 0.01)]
    assert config_diff(a.to_dict(), c.to_dict(), lr_grid=(0.001, 0.003, 0.01)) == []
    assert config_diff(a.to_dict(), replace(a, train={"lr": 0.02}).to_dict(), lr_grid=(0.001, 0.01)) == [
        ("train.lr", 0.003, 0.02)
    ]


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
    # every run learned (exact match 1.0 over 1..3): all tie in distribution; past L none
    # 0.5, alibi 0.4, sinusoidal 0.25
    assert table.rows == [
        ["copy", "exact match 1..3", "1.000 ± 0.000", "1 of 3", "sinusoidal 1.000 ± 0.000"],
        ["copy", "token accuracy (3, 6]", "0.400 ± 0.000", "2 of 3", "none 0.500 ± 0.000"],
    ]
    with pytest.raises(ValueError, match="no record of the runs"):
        merge(c, [])


def test_standings_rank_past_l_only_runs_that_learned(tmp_path):
    c = plan_compare("alibi", "smoke", baselines=_baselines(tmp_path), seeds=[0, 1])
    none_unlearned = [
        {**r, "metrics": [{**m, "exact_match": 0.5} if m["length"] <= 3 else m for m in r["metrics"]]}
        if r["encoding"] == "none"
        else r
        for r in c.baselines
    ]
    merged = none_unlearned + [_record(cfg, 0.4) for cfg in c.configs]
    rows = standings("alibi", merged).rows
    assert rows[0][3] == "1 of 3"  # in distribution every run is compared: that is the measure of learning
    assert rows[1] == ["copy", "token accuracy (3, 6]", "0.400 ± 0.000", "1 of 2", "alibi 0.400 ± 0.000"]
    alone = c.baselines + [_record(cfg, 0.9, inside=0.6) for cfg in c.configs]  # alibi did not learn
    rows = standings("alibi", alone).rows
    assert rows[1] == ["copy", "token accuracy (3, 6]", "-", "did not learn (exact match 1..L 0.60)", rows[1][4]]
    assert rows[1][4] == "none 0.500 ± 0.000"


def test_a_swept_preset_compares_both_phases(tmp_path):
    """The full preset sweeps: NAME's plan has phase 1 (seed 0 at three rates) and phase 2;
    baselines of a swept study (their unchosen rates too) pass the check; merge takes
    phase 2 at the rate chosen from NAME's own sweep."""
    from posenc.experiments.study import plan_phases

    base = plan_phases("full", encodings=["none"], tasks=["copy"], seeds=[0, 1])
    sweep = [_record(cfg, 0.5, validation=cfg.train.lr) for cfg in base.first]  # 1e-2 wins
    records = sweep + [_record(cfg, 0.5) for cfg in base.second_phase(sweep)]
    assert {r["config"]["train"]["lr"] for r in records if r["seed"] == 1} == {0.01}
    c = plan_compare("alibi", "full", baselines=_write(tmp_path / "b.jsonl", records), tasks=["copy"], seeds=[0, 1])
    assert [(cfg.train.seed, cfg.train.lr) for cfg in c.configs] == [(0, 0.001), (0, 0.003), (0, 0.01), (1, 0.003)]
    assert len(c.baselines) == 4
    ours = [_record(cfg, 0.4, validation=1.0 - cfg.train.lr) for cfg in c.plan.first]  # 1e-3 wins
    with pytest.raises(ValueError, match="no record of the runs"):
        merge(c, ours)  # phase 2 is missing
    ours += [_record(cfg, 0.4) for cfg in c.plan.second_phase(ours)]
    merged = merge(c, ours)
    assert [(r["encoding"], r["seed"], r["config"]["train"]["lr"]) for r in merged[4:]] == [
        ("alibi", 0, 0.001),
        ("alibi", 0, 0.003),
        ("alibi", 0, 0.01),
        ("alibi", 1, 0.001),
    ]
    rows = standings("alibi", merged).rows  # the chosen rates only: 2 runs per encoding
    assert rows[1] == ["copy", "token accuracy (8, 16]", "0.400 ± 0.000", "2 of 2", "none 0.500 ± 0.000"]


def test_the_default_baselines_are_the_current_protocol_records():
    """The default is docs/data/study_results.jsonl; copy's runs are all in (both phases
    of the sweep, every encoding of the preset): NAME is planned among all of them."""
    c = plan_compare("alibi", "full", tasks=["copy"])
    assert c.source == str(default_baselines()) and default_baselines() == (DOCS / "study_results.jsonl").resolve()
    assert [(cfg.train.seed, cfg.train.lr) for cfg in c.configs] == [
        (0, 0.001),
        (0, 0.003),
        (0, 0.01),
        (1, 0.003),
        (2, 0.003),
    ]
    preset = {cfg.encoding_label for cfg in plan_phases("full", tasks=["copy"]).outline}
    assert {r["encoding"] for r in c.baselines} == preset - {"alibi"} and c.replaced == 5


def test_incomplete_baselines_are_refused_naming_what_is_missing(tmp_path):
    """A task whose baseline encodings lack a seed, a sweep rate or every run (a re-run
    still training) is refused: a rank among part of the encodings is not the study's."""
    base = plan_phases("full", encodings=["none", "sinusoidal"], tasks=["copy", "reverse"], seeds=[0, 1])
    sweep = [_record(cfg, 0.5, validation=cfg.train.lr) for cfg in base.first]
    full = sweep + [_record(cfg, 0.5) for cfg in base.second_phase(sweep)]
    kw = {"tasks": ["copy", "reverse"], "seeds": [0, 1]}
    assert len(plan_compare("alibi", "full", baselines=_write(tmp_path / "a.jsonl", full), **kw).baselines) == 16

    def refused(records, match):
        with pytest.raises(ValueError, match=match):
            plan_compare("alibi", "full", baselines=_write(tmp_path / "b.jsonl", records), **kw)

    no_rate = [
        r
        for r in full
        if not (
            r["task"] == "reverse"
            and r["encoding"] == "none"
            and r["seed"] == 0
            and r["config"]["train"]["lr"] == 0.001
        )
    ]
    refused(no_rate, r"incomplete \(1 encoding\(s\) of reverse: reverse none: seed 0 at lr 0.001\).*complete \(copy\)")
    with pytest.raises(ValueError, match=r"reverse none: seed 0 at lr 0.001"):  # the sweep seed alone
        plan_compare("alibi", "full", baselines=_write(tmp_path / "c.jsonl", no_rate), tasks=["reverse"], seeds=[0])
    no_seed = [r for r in full if not (r["task"] == "copy" and r["encoding"] == "sinusoidal" and r["seed"] == 1)]
    refused(no_seed, r"of copy: copy sinusoidal: seed 1\).*complete \(reverse\)")
    no_runs = [r for r in full if not (r["task"] == "reverse" and r["encoding"] == "sinusoidal")]
    refused(no_runs, r"of reverse: reverse sinusoidal: no runs\)")
