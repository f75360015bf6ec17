"""The learning-rate sweep: ``choose_lr`` (against a brute-force reference), ``selected``
and the sweep table on hand-made records, the two-phase plan of ``plan_phases``, and a
half-finished two-phase study resumed with the smoke preset and a two-rate grid."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posenc.experiments.results import read_results
from posenc.experiments.study import LR_GRID, StudyPlan, plan_phases, plan_study, run_study
from posenc.experiments.summary import (
    PRESET_LR,
    choose_lr,
    mean_ranks,
    not_learned,
    selected,
    sweep_seed,
    sweep_table,
    tables,
)

GRID = (1e-3, 3e-3, 1e-2)


def _syn(task, enc, seed, lr, val, *, inside=1.0, past=0.5, L=2):
    """A synthetic record at learning rate ``lr`` with validation exact match ``val``."""
    metrics = [
        {"length": n, "exact_match": inside if n <= L else past, "token_accuracy": inside if n <= L else past}
        for n in (1, 2, 4)
    ]
    rec = {
        "run_id": f"{task}__{enc}__s{seed}__lr{lr:g}",
        "task": task,
        "encoding": enc,
        "seed": seed,
        "train_length": L,
        "config": {"train": {"lr": lr, "seed": seed}},
        "metrics": metrics,
    }
    if val is not None:
        rec["validation"] = {"metric": "exact_match", "value": val, "higher_is_better": True, "size": 64}
    return rec


def _lm(enc, seed, lr, val):
    return {
        "run_id": f"lm__{enc}__s{seed}__lr{lr:g}",
        "task": "shakespeare",
        "encoding": enc,
        "seed": seed,
        "train_length": 4,
        "config": {"train": {"lr": lr}},
        "metrics": [{"length": n, "ppl": 5.0, "ppl_sliding": 5.0} for n in (4, 8)],
        "validation": {"metric": "ppl", "value": val, "higher_is_better": False, "size": 4096},
    }


# -- choose_lr -------------------------------------------------------------------------------


def test_choose_lr_takes_the_best_validation_per_task_and_encoding():
    recs = [_syn("copy", "rope", 0, lr, v) for lr, v in zip(GRID, (0.5, 0.7, 0.9), strict=True)]
    recs += [_syn("copy", "alibi", 0, lr, v) for lr, v in zip(GRID, (0.8, 0.6, 0.1), strict=True)]
    recs += [_lm("rope", 0, lr, v) for lr, v in zip(GRID, (7.0, 6.5, 6.9), strict=True)]  # lower is better
    assert choose_lr(recs) == {("copy", "rope"): 1e-2, ("copy", "alibi"): 1e-3, ("shakespeare", "rope"): 3e-3}


def test_choose_lr_ties_go_to_the_preset_rate_then_the_smaller_one():
    same = [_syn("copy", "rope", 0, lr, 1.0) for lr in GRID]
    assert choose_lr(same) == {("copy", "rope"): PRESET_LR}
    without_preset = [_syn("copy", "rope", 0, 1e-2, 1.0), _syn("copy", "rope", 0, 1e-3, 1.0)]
    without_preset.append(_syn("copy", "rope", 0, 3e-3, 0.5))
    assert choose_lr(without_preset) == {("copy", "rope"): 1e-3}
    assert choose_lr(without_preset, preferred=1e-2) == {("copy", "rope"): 1e-2}


def test_choose_lr_a_diverged_run_is_the_worst():
    recs = [_lm("rope", 0, 1e-3, 9.0), _lm("rope", 0, 3e-3, math.inf), _lm("rope", 0, 1e-2, math.nan)]
    assert choose_lr(recs) == {("shakespeare", "rope"): 1e-3}


def test_choose_lr_reads_only_the_sweep_seed():
    recs = [_syn("copy", "rope", 0, lr, v) for lr, v in zip(GRID, (0.9, 0.5, 0.5), strict=True)]
    recs += [_syn("copy", "rope", 1, 3e-3, 1.0), _syn("copy", "rope", 2, 3e-3, 1.0)]  # phase 2: one rate each
    assert sweep_seed(recs) == 0
    assert choose_lr(recs) == {("copy", "rope"): 1e-3}


def test_choose_lr_needs_validation_only_to_compare_rates():
    assert choose_lr([_syn("copy", "rope", 0, 3e-3, None)]) == {("copy", "rope"): 3e-3}
    with pytest.raises(ValueError, match="has no validation score .* train the sweep again"):
        choose_lr([_syn("copy", "rope", 0, 1e-3, None), _syn("copy", "rope", 0, 3e-3, 0.5)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=3, max_size=3), st.permutations(range(3)))
def test_choose_lr_equals_a_brute_force_reference(values, order):
    """The chosen rate has the highest value; among equal values the preset's rate wins,
    else the smallest; the order of the records does not matter."""
    recs = [_syn("copy", "rope", 0, lr, v) for lr, v in zip(GRID, values, strict=True)]
    best = max(values)
    tied = [lr for lr, v in zip(GRID, values, strict=True) if v == best]
    want = PRESET_LR if PRESET_LR in tied else min(tied)
    assert choose_lr([recs[i] for i in order]) == {("copy", "rope"): want}


# -- selected, the sweep table, gated ranks ---------------------------------------------------


def _study():
    """copy: rope swept (1e-2 chosen) then seeds 1 and 2 at 1e-2; alibi not swept."""
    recs = [
        _syn("copy", "rope", 0, lr, v, past=p) for lr, v, p in zip(GRID, (0.2, 0.6, 0.95), (0.0, 0.1, 0.9), strict=True)
    ]
    recs += [_syn("copy", "rope", s, 1e-2, 0.9, past=0.8) for s in (1, 2)]
    recs += [_syn("copy", "alibi", s, 3e-3, None, past=0.3) for s in (0, 1, 2)]
    return recs


def test_selected_keeps_only_the_chosen_rate_of_a_swept_pair():
    recs = _study()
    kept = selected(recs)
    assert [r["run_id"] for r in kept] == [
        r["run_id"] for r in recs if "rope" not in r["run_id"] or "lr0.01" in r["run_id"]
    ]
    assert [(r["encoding"], r["seed"]) for r in kept] == [("rope", 0), ("rope", 1), ("rope", 2)] + [
        ("alibi", s) for s in (0, 1, 2)
    ]
    assert selected(kept) == kept  # idempotent


def test_records_without_a_sweep_pass_unchanged():
    old = [_syn("copy", "alibi", s, 3e-3, None) for s in (0, 1)]
    old.append({**_syn("copy", "rope", 0, 3e-3, None), "config": {}})  # no config.train.lr at all
    assert selected(old) == old


def test_tables_and_warnings_see_only_the_chosen_runs():
    recs = _study()
    recs[0]["metrics"] = [{**m, "exact_match": 0.1} for m in recs[0]["metrics"]]  # lr 1e-3: did not learn
    assert not_learned(recs) == []  # the unchosen sweep run is not a finding
    assert [t.rows for t in tables(recs)] == [t.rows for t in tables(selected(recs))]
    em = tables(recs)[0]
    assert em.rows[0][0] == "rope" and em.rows[0][3] == "0.83 ± 0.06"  # length 4 over lr 1e-2's three seeds


def test_sweep_table_lists_every_rate_and_the_choice():
    table = sweep_table(_study())
    assert table.columns == [
        "task",
        "encoding",
        "seed",
        "validation",
        "lr 0.001",
        "lr 0.003",
        "lr 0.01",
        "chosen lr",
        "chosen at",
    ]
    assert table.rows == [
        [
            "copy",
            "rope",
            "0",
            "exact_match (higher is better), size 64",
            "0.2000",
            "0.6000",
            "0.9500",
            "0.01",
            "highest tried",
        ]
    ]
    assert sweep_table(selected(_study())) is None


def test_mean_ranks_leave_out_runs_that_did_not_learn():
    recs = [
        _syn("copy", "a", 0, 3e-3, None, past=0.9),
        _syn("copy", "b", 0, 3e-3, None, past=0.5),
        _syn("copy", "c", 0, 3e-3, None, inside=0.5, past=1.0),  # best past L, but never learned copy
        _syn("sort", "a", 0, 3e-3, None, inside=0.95, past=0.2),
        _syn("sort", "b", 0, 3e-3, None, past=0.4),
        _syn("sort", "c", 0, 3e-3, None, past=0.3),
        _syn("sort", "c", 1, 3e-3, None, inside=0.2, past=0.9),  # one of c's two sort runs did not learn
    ]
    t = mean_ranks(recs)
    assert "only runs that learned in distribution (exact match over lengths 1..L >= 0.9)" in t.title
    assert t.columns[:4] == ["encoding", "mean rank", "per-seed rank (1 seed)", "tasks ranked"]
    # copy: a 1, b 2 (c not ranked); sort: b 1, c 2 (its learned seed 0 only), a 3.
    assert t.rows == [
        ["b", "1.50", "1.50", "2", "0.500", "0.400"],
        ["a", "2.00", "2.00", "2", "0.900", "0.200"],
        ["c", "2.00", "2.00", "1", "did not learn (0.50)", "0.300 (1 of 2 learned)"],
    ]
    nobody = mean_ranks([_syn("copy", "a", 0, 3e-3, None, inside=0.1)])
    assert nobody.rows == [["a", "did not learn", "-", "0", "did not learn (0.10)"]]


# -- the two-phase plan ---------------------------------------------------------------------


def test_full_preset_plans_the_sweep_first_and_the_other_seeds_later():
    plan = plan_phases("full", encodings=["rope", "alibi"], tasks=["copy"])
    assert plan.lr_grid == LR_GRID == (1e-3, PRESET_LR, 1e-2) and plan.preferred_lr == PRESET_LR
    assert [(c.encoding_label, c.train.seed, c.train.lr) for c in plan.first] == [
        (e, 0, lr) for e in ("rope", "alibi") for lr in LR_GRID
    ]
    assert [(c.encoding_label, c.train.seed, c.train.lr) for c in plan.later] == [
        (e, s, PRESET_LR) for e in ("rope", "alibi") for s in (1, 2)
    ]
    assert len({c.run_id for c in plan.outline}) == 10
    # the sweep's run at the preset's rate is the run without a sweep (a finished one is reused)
    (plain,), _ = plan_study("full", encodings=["rope"], tasks=["copy"], seeds=[0], lr_sweep=False)
    assert plain.run_id == plan.first[1].run_id
    assert plan_study("full", encodings=["rope"], tasks=["copy"])[0] == list(plan.first[:3])


def test_second_phase_takes_the_rates_chosen_from_phase_1():
    plan = plan_phases("full", encodings=["rope", "alibi"], tasks=["copy"])
    values = {("rope", 1e-3): 0.3, ("rope", 3e-3): 0.3, ("rope", 1e-2): 0.7, ("alibi", 1e-3): 0.8}
    sweep = []
    for c in plan.first:
        rec = _syn("copy", c.encoding_label, 0, c.train.lr, values.get((c.encoding_label, c.train.lr), 0.5))
        sweep.append({**rec, "run_id": c.run_id})
    with pytest.raises(ValueError, match="phase 1.* 1 unfinished run"):
        plan.second_phase(sweep[:-1])
    assert plan.pending(sweep[:-1]) == 1 + 4
    assert any("fixed when phase 1 has finished" in line for line in plan.describe(sweep[:-1]))
    second = plan.second_phase(sweep)
    assert [(c.encoding_label, c.train.seed, c.train.lr) for c in second] == [
        ("rope", 1, 1e-2),
        ("rope", 2, 1e-2),
        ("alibi", 1, 1e-3),
        ("alibi", 2, 1e-3),
    ]
    assert plan.runs(sweep) == [*plan.first, *second] and plan.pending(sweep) == 4
    lines = plan.describe(sweep)
    assert lines[0].startswith("phase 1, learning-rate sweep: 6 runs, seed 0 of each of the 2 task/encoding pairs")
    assert lines[0].endswith("at lr 0.001, 0.003, 0.01; 6 finished")
    assert lines[1].startswith("phase 2, after phase 1: 4 runs, seeds 1, 2")
    assert lines[1].endswith("chosen: 0.001 for 1, 0.01 for 1 pairs; 0 finished")


def test_quick_has_one_phase_unless_asked_and_bad_grids_are_refused():
    quick = plan_phases("quick", encodings=["rope"], tasks=["copy"], seeds=[0, 1])
    assert quick.lr_grid == () and quick.later == () and [c.train.lr for c in quick.first] == [PRESET_LR] * 2
    assert quick.second_phase([]) == [] and quick.describe()[0].startswith("one phase: 2 runs")
    swept = plan_phases("quick", encodings=["rope"], tasks=["copy"], seeds=[1, 0], lr_sweep=True, lr_grid=[1e-3, 0.02])
    assert [(c.train.seed, c.train.lr) for c in swept.outline] == [(1, 1e-3), (1, 0.02), (0, PRESET_LR)]
    with pytest.raises(ValueError, match="has no sweep: pass lr_sweep=True"):
        plan_phases("quick", lr_grid=[1e-3])
    for bad in ([], [1e-3, 1e-3], [0.0], [float("nan")], ["x"]):
        with pytest.raises(ValueError, match="lr_grid must"):
            plan_phases("full", encodings=["rope"], tasks=["copy"], lr_grid=bad)


def test_preset_task_settings_and_the_normalized_length():
    plan = plan_phases("full", encodings=["normalized", "rope"], tasks=["copy", "recall", "count", "shakespeare"])
    by = {(c.task.name, c.encoding_label): c for c in plan.outline}
    assert {c.task.eval_samples for c in plan.outline if c.task.name != "shakespeare"} == {256}
    assert by[("recall", "rope")].task.num_symbols == 128 and by[("count", "rope")].task.num_symbols == 4
    # the longest training input: BOS + n + SEP + answer, less the last token, at n = L = 8
    assert by[("copy", "normalized")].model.encoding_params == {"length": 1 + 8 + 1 + 8 - 1}
    assert by[("recall", "normalized")].model.encoding_params == {"length": 1 + 16 + 1 + 16 - 1}
    assert by[("count", "normalized")].model.encoding_params == {"length": 1 + 9 + 1 + 1 - 1}
    assert by[("shakespeare", "normalized")].model.encoding_params == {"length": 64}
    assert by[("copy", "rope")].model.encoding_params == {}
    with pytest.raises(ValueError, match="'normalized' cannot be built .* fixed length"):  # positions past N
        plan_study("quick", encodings=["normalized+randpos"], tasks=["copy"])
    smoke = plan_phases("smoke")
    assert {c.task.eval_samples for c in smoke.first} == {8}


def test_run_study_accepts_a_plan_or_a_list_only():
    with pytest.raises(TypeError, match="StudyPlan or RunConfig"):
        run_study(["copy"], "unused")
    assert isinstance(plan_phases("smoke"), StudyPlan)


# -- a half-finished two-phase study, resumed ---------------------------------------------------


def test_a_half_finished_two_phase_study_resumes(tmp_path):
    plan = plan_phases(
        "smoke", encodings=["sinusoidal"], seeds=[0, 1], steps=5, threads=1, lr_sweep=True, lr_grid=(1e-3, 3e-3)
    )
    assert len(plan.first) == 2 and len(plan.later) == 1
    run_study(list(plan.first[:1]), tmp_path)  # interrupted after the sweep's first run
    assert plan.pending(read_results(tmp_path)) == 2
    events = []
    records = run_study(plan, tmp_path, on_run_end=lambda i, r, skipped: events.append((i, skipped)))
    assert events == [(0, True), (1, False), (2, False)]
    chosen = choose_lr(records[:2])[("copy", "sinusoidal")]
    assert records[2]["seed"] == 1 and records[2]["config"]["train"]["lr"] == chosen
    assert [r["run_id"] for r in read_results(tmp_path)] == [r["run_id"] for r in records]
    again = []
    assert run_study(plan, tmp_path, on_run_end=lambda i, r, s: again.append(s)) == records
    assert again == [True] * 3 and plan.pending(records) == 0
    assert (
        list(itertools.chain(*(sorted(r["validation"]) for r in records[:2])))
        == [
            "higher_is_better",
            "metric",
            "size",
            "value",
        ]
        * 2
    )


# -- the study's outputs and conclusions ------------------------------------------------------


def test_conclusions_compare_past_l_only_runs_that_learned_and_state_the_sweep():
    from posenc.pipeline.conclusions import study_conclusions

    recs = [*_study(), _syn("copy", "none", 0, 3e-3, None, inside=0.5, past=0.95)]  # best past L, not learned
    text = study_conclusions(recs)
    assert text[0].startswith("Learning rates chosen on the in-distribution validation score")
    assert "(0.001, 0.003, 0.01; never the test lengths): 0.01 for 1 of 1 pairs (1 at the lowest or highest" in text[0]
    (copy,) = [s for s in text if s.startswith("copy")]
    assert "exact match over lengths 1..L: rope, alibi 1.00 best, none 0.50 worst" in copy  # every run compared
    assert "at 4 (2L): rope 0.83 best, alibi 0.30 worst." in copy  # none's 0.95 is not compared
    assert copy.endswith("Did not learn in distribution (not compared past L): none 0.50.")
    (ranks,) = [s for s in text if s.startswith("Mean rank")]
    assert "rope (1.00, 1 task), alibi (2.00, 1 task). Not ranked (learned no task): none." in ranks


def test_results_md_holds_the_sweep_table_and_only_the_chosen_runs(tmp_path):
    from posenc.pipeline.study import write_study_outputs

    text = write_study_outputs(tmp_path, _study(), report=False)["markdown"].read_text(encoding="utf-8")
    sweep = text.split("## Learning-rate sweep")[1]
    assert "Every table below shows 6 of the 8 runs" in sweep and "the sweep's other 2 runs appear only here" in sweep
    assert "| copy | rope | 0 | exact_match (higher is better), size 64 | 0.2000 | 0.6000 | 0.9500 | 0.01 |" in sweep
    em = text.split("**copy: exact match by length")[1]
    assert "| rope | 1.00 ± 0.00 | 1.00 ± 0.00 | 0.83 ± 0.06 |" in em  # lr 1e-2 over its three seeds
