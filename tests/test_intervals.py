"""The study's interval tables (posenc.experiments.intervals): each cell is the pooled
estimate of the chosen rate's runs that learned, with stats' two-stage bootstrap
interval (Wilson's where the bootstrap is degenerate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posenc.experiments.intervals import interval_tables, ppl_interval, rate_interval, without_counts
from posenc.experiments.published import randpos_table
from posenc.experiments.stats import pooled_ci, pooled_ppl_ci, wilson_ci
from posenc.experiments.summary import judged

N = 256  # test examples per length
R = 2000  # resamples: enough for the checks, fast


def _syn(enc: str, seed: int, past: dict[int, int], *, inside: int = N, lr: float = 3e-3, val: float = 1.0) -> dict:
    """A copy record at L = 2: ``inside`` hits at lengths 1, 2 and ``past[n]`` at n > 2."""
    metrics = [{"length": n, "exact_match": inside / N, "exact_hits": inside, "samples": N} for n in (1, 2)]
    metrics += [{"length": n, "exact_match": h / N, "exact_hits": h, "samples": N} for n, h in past.items()]
    return {
        "run_id": f"{enc}-{seed}-{lr}",
        "task": "copy",
        "encoding": enc,
        "seed": seed,
        "train_length": 2,
        "config": {"train": {"lr": lr}},
        "metrics": metrics,
        "validation": {"metric": "exact_match", "value": val, "higher_is_better": True},
    }


def _lm(enc: str, seed: int, segments: dict[int, list[float]], size: int = 100) -> dict:
    metrics = [
        {"length": n, "ppl": 1.0, "ppl_sliding": 1.0, "nll_sliding_segments": s, "segment_tokens": size}
        for n, s in segments.items()
    ]
    return {
        "run_id": f"{enc}-{seed}",
        "task": "shakespeare",
        "encoding": enc,
        "seed": seed,
        "train_length": 4,
        "config": {"train": {"lr": 3e-3}},
        "metrics": metrics,
    }


def _cell(table, enc: str, column: str) -> str:
    row = next(r for r in table.rows if r[0] == enc)
    return row[table.columns.index(column)]


def test_a_cell_pools_the_runs_that_learned_with_the_two_stage_bootstrap():
    records = [
        _syn("rope", 0, {3: 100}),
        _syn("rope", 1, {3: 150}),
        _syn("rope", 2, {3: 250}, inside=200),  # 200/256 = 0.78 over 1..L: did not learn, left out
    ]
    (table,) = interval_tables(records, resamples=R)
    lo, hi = pooled_ci([(100, N), (150, N)], resamples=R, seed=0)
    assert _cell(table, "rope", "runs learned") == "2 of 3"
    assert _cell(table, "rope", "3") == f"{(100 + 150) / (2 * N):.2f} [{lo:.2f}, {hi:.2f}]"
    assert table.columns == ["encoding", "runs learned", "2", "3"]
    assert table.metric == "exact_match" and table.higher_is_better


def test_no_run_that_learned_is_a_did_not_learn_row_without_numbers():
    (table,) = interval_tables([_syn("none", 0, {3: 10}, inside=10)], resamples=R)
    assert table.rows == [["none", "0 of 1", "did not learn", "–"]]


def test_every_run_at_zero_takes_wilsons_interval_of_the_pooled_count():
    (table,) = interval_tables([_syn("t5", 0, {3: 0}), _syn("t5", 1, {3: 0})], resamples=R)
    lo, hi = wilson_ci(0, 2 * N)
    assert _cell(table, "t5", "3") == f"0.00 [{lo:.2f}, {hi:.2f}]" and hi > 0.005


def test_only_the_sweeps_chosen_rate_is_pooled():
    records = [
        _syn("alibi", 0, {3: 200}, lr=1e-3, val=0.99),  # chosen: best validation
        _syn("alibi", 0, {3: 20}, lr=3e-3, val=0.95),
        _syn("alibi", 1, {3: 180}, lr=1e-3),
    ]
    (table,) = interval_tables(records, resamples=R)
    assert _cell(table, "alibi", "runs learned") == "2 of 2"
    assert _cell(table, "alibi", "3").startswith(f"{(200 + 180) / (2 * N):.2f} [")


def test_a_corpus_cell_is_the_perplexity_of_all_tokens_with_the_block_bootstrap():
    a, b = [300.0, 350.0, 320.0], [280.0, 400.0, 310.0]
    records = [_lm("rope", 0, {4: [200.0] * 3, 8: a}), _lm("rope", 1, {4: [210.0] * 3, 8: b})]
    (table,) = interval_tables(records, resamples=R)
    est = math.exp((sum(a) + sum(b)) / 600)
    lo, hi = pooled_ppl_ci([(a, 100), (b, 100)], resamples=R, seed=0)
    assert _cell(table, "rope", "8") == f"{est:.2f} [{lo:.2f}, {hi:.2f}]"
    assert _cell(table, "rope", "runs") == "2"
    assert table.metric == "ppl_sliding" and not table.higher_is_better


def test_records_without_counts_are_named_and_get_no_table():
    old = _syn("rope", 0, {3: 10})
    for m in old["metrics"]:
        del m["exact_hits"]
    assert without_counts([old]) == ["copy"] and interval_tables([old]) == []
    assert without_counts([_syn("rope", 0, {3: 10})]) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        rate_interval([])
    with pytest.raises(ValueError, match="at least one"):
        ppl_interval([])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 64)), min_size=1, max_size=4))
def test_the_estimate_lies_inside_its_interval(runs):
    runs = [(min(h, n), n) for h, n in runs]
    est, lo, hi = rate_interval(runs, resamples=500)
    assert 0.0 <= lo <= est + 1e-12 and est - 1e-12 <= hi <= 1.0


def test_randomized_runs_are_judged_at_ruoss_test_positions():
    """A +randpos run is trained and validated at randomized positions, so the tables
    score it there (metrics_random) and keep its scores at 0..s-1 as metrics_arange."""
    rand = _syn("rope+randpos", 0, {3: 10}, inside=100)  # at 0..s-1: did not learn
    rand["metrics_random"] = _syn("x", 0, {3: 120})["metrics"]  # at Ruoss's positions: learned
    plain = _syn("rope", 0, {3: 20})
    assert judged(plain) is plain
    seen = judged(rand)
    assert seen["metrics"] is rand["metrics_random"] and seen["metrics_arange"] is rand["metrics"]
    (table,) = interval_tables([plain, rand], resamples=R)
    assert _cell(table, "rope+randpos", "runs learned") == "1 of 1"
    assert _cell(table, "rope+randpos", "3").startswith(f"{120 / N:.2f} [")
    (ruoss,) = [t for t in [randpos_table([plain, rand], key="exact_match")] if t is not None]
    row = dict(zip(ruoss.columns, ruoss.rows[0], strict=True))
    assert row["(L, 2L] +randpos"] == f"{120 / N:.2f}" and row["(L, 2L] +randpos at 0..s-1"] == f"{10 / N:.2f}"


def test_the_report_section_holds_every_interval_table():
    from posenc.pipeline.report import intervals_section

    records = [_syn("rope", 0, {3: 100}), _lm("rope", 0, {4: [200.0] * 3})]
    tables = interval_tables(records, resamples=R)
    section = intervals_section(tables)
    assert section["title"] == "Scores with 95% intervals" and len(section["tables"]) == 2
    assert [t["rows"] for t in section["tables"]] == [t.rows for t in tables]


def test_a_conclusion_gives_the_interval_of_its_single_best_encoding():
    from posenc.pipeline.conclusions import task_sentence

    by_enc = {"rope": [_syn("rope", 0, {4: 100}), _syn("rope", 1, {4: 120})], "t5": [_syn("t5", 0, {4: 10})]}
    _, lo, hi = rate_interval([(100, N), (120, N)])
    assert f"at 4 (2L): rope 0.43 best, t5 0.04 worst (95% interval of rope: [{lo:.2f}, {hi:.2f}])" in task_sentence(
        "copy", by_enc
    )
    tie = {"rope": [_syn("rope", 0, {4: 100})], "t5": [_syn("t5", 0, {4: 100})]}
    assert "95% interval" not in task_sentence("copy", tie)  # no single best


def test_paired_draws_pair_the_seeds_and_the_segments():
    """``paired_ppl_draws``: one term alone is ``pooled_ppl_ci``'s bootstrap; two terms
    whose segments differ by a constant NLL have that constant's ratio on every draw (the
    same seeds and segments on both sides). ``paired_rate_draws``: one term alone is
    ``pooled_ci``'s; runs that scored all or nothing on both terms differ by 0 on every
    draw (the same seeds on both sides)."""
    from posenc.experiments.stats import paired_ppl_draws, paired_rate_draws

    g = np.random.default_rng(2)
    runs = [(g.normal(2.0, 0.3, size=8) * 100).tolist() for _ in range(3)]
    alone = paired_ppl_draws([[(segs, 100)] for segs in runs])[:, 0]
    lo, hi = pooled_ppl_ci([(segs, 100) for segs in runs])
    assert np.quantile(alone, 0.025) == pytest.approx(lo, rel=0.01)
    assert np.quantile(alone, 0.975) == pytest.approx(hi, rel=0.01)
    shifted = paired_ppl_draws([[(segs, 100), ([x + 5.0 for x in segs], 100)] for segs in runs])
    assert shifted[:, 1] / shifted[:, 0] == pytest.approx(np.full(len(shifted), math.exp(5.0 / 100)))
    counts = [(200, 256), (230, 256), (150, 256)]
    rates = paired_rate_draws([[c] for c in counts])[:, 0]
    lo, hi = pooled_ci(counts)
    assert np.quantile(rates, 0.025) == pytest.approx(lo, abs=0.01)
    assert np.quantile(rates, 0.975) == pytest.approx(hi, abs=0.01)
    extremes = paired_rate_draws([[(0, 64), (0, 64)], [(64, 64), (64, 64)]])
    assert (extremes[:, 0] == extremes[:, 1]).all() and 0.0 < extremes[:, 0].mean() < 1.0
    with pytest.raises(ValueError, match="same number of segments"):
        paired_ppl_draws([[([1.0, 2.0], 10), ([1.0], 10)]])
    with pytest.raises(ValueError, match="same number"):
        paired_rate_draws([[(1, 2)], [(1, 2), (1, 2)]])
    with pytest.raises(ValueError, match=r"runs\[0\]\[1\]"):
        paired_rate_draws([[(1, 2), (3, 2)]])
