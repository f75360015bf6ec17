"""The comparison tables beside published findings, on hand-made records."""

from __future__ import annotations

import math

from posenc.experiments.published import (
    kazemnejad_ranks,
    press_sliding_table,
    press_table,
    published_tables,
    randpos_lm_table,
    randpos_table,
)


def _set(m, key, p):
    """Metrics entry ``m`` with perplexity ``p`` under ``key`` (``ppl`` or ``ppl_sliding``):
    two test segments of 10 tokens with the same NLL, so a bootstrap over segments is the
    point and the intervals come from the seeds alone."""
    m[key] = p
    m["nll_segments" if key == "ppl" else "nll_sliding_segments"] = [10 * math.log(p)] * 2
    m["segment_tokens"] = 10
    return m


def _lm(enc, seed, ppl_by_len, L=10):
    metrics = [_set(_set({"length": n}, "ppl", p), "ppl_sliding", p) for n, p in ppl_by_len.items()]
    return {
        "run_id": f"lm{enc}{seed}",
        "task": "shakespeare",
        "encoding": enc,
        "seed": seed,
        "train_length": L,
        "metrics": metrics,
    }


def _syn(task, enc, seed, acc_by_len, L=2, lr=None, val=None):
    metrics = [{"length": n, "exact_match": a, "token_accuracy": a} for n, a in acc_by_len.items()]
    rec = {
        "run_id": f"{task}{enc}{seed}{lr}",
        "task": task,
        "encoding": enc,
        "seed": seed,
        "train_length": L,
        "metrics": metrics,
    }
    if lr is not None:
        rec["config"] = {"train": {"lr": lr}}
        rec["validation"] = {"metric": "exact_match", "value": val, "higher_is_better": True, "size": 8}
    return rec


def test_press_table_ratios_and_paper_values():
    recs = [
        _lm("alibi", 0, {10: 5.0, 20: 5.0, 40: 4.5, 80: 4.0}),
        _lm("alibi", 1, {10: 4.0, 20: 4.4, 40: 4.0, 80: 4.0}),
        _lm("learned", 0, {10: 5.0, 20: 50.0, 40: 60.0, 80: 70.0}),  # not in Press's table: left out
    ]
    (t,) = press_table(recs)
    assert t.title.startswith("Press et al. 2022 Table 2 vs shakespeare (L=10, 2 seeds): ppl(E) / ppl(L), pooled")
    # Two seeds: a pooled perplexity is the geometric mean, a bootstrap over seeds draws
    # seed 0 twice, once each or seed 1 twice, so the 95% interval runs between the two
    # seeds' values. 2L ratios 1.0 and 1.1: sqrt(1.1) = 1.049; 4L 0.9, 1.0; 8L 0.8, 1.0;
    # ppl at L 5, 4: sqrt(20) = 4.47
    want = ["1.05 [1.00, 1.10]", "0.93", "0.95 [0.90, 1.00]", "0.89 [0.80, 1.00]", "4.47 [4.00, 5.00]"]
    assert t.rows == [["alibi", "0.95", *want]]


def test_press_sliding_table_reads_the_sliding_perplexity():
    recs = [
        _lm("alibi", 0, {10: 5.0, 20: 5.0, 40: 4.5, 80: 4.0}),
        _lm("alibi", 1, {10: 4.0, 20: 4.4, 40: 4.0, 80: 4.0}),
    ]
    for r in recs:  # sliding: flat at 2L and 4L, one step at 8L; non-overlapping untouched
        for m in r["metrics"]:
            _set(m, "ppl_sliding", {10: 2.0, 20: 2.0, 40: 2.0, 80: 3.0}[m["length"]])
    (t,) = press_sliding_table(recs)
    flat = "1.00 [1.00, 1.00]"
    assert t.rows == [["alibi", "0.95", flat, "0.93", flat, "1.50 [1.50, 1.50]", "2.00 [2.00, 2.00]"]]
    assert "with sliding windows" in t.title and len(published_tables(recs)) == 2


def test_kazemnejad_ranks_only_their_encodings_with_paper_rank():
    recs = [
        _syn("copy", "none", 0, {1: 1.0, 2: 1.0, 4: 0.9}),
        _syn("copy", "rope", 0, {1: 1.0, 2: 1.0, 4: 0.2}),
        _syn("copy", "binary", 0, {1: 1.0, 2: 1.0, 4: 1.0}),  # not compared by the paper
    ]
    t = kazemnejad_ranks(recs)
    assert [r[:3] for r in t.rows] == [["none", "1", "1.00"], ["rope", "4", "2.00"]]
    assert t.columns[:3] == ["encoding", "paper rank", "mean rank"]


def test_kazemnejad_ranks_only_runs_that_learned():
    recs = [
        _syn("copy", "none", 0, {1: 0.5, 2: 0.5, 4: 0.9}),  # best past L, but did not learn copy
        _syn("copy", "rope", 0, {1: 1.0, 2: 1.0, 4: 0.2}),
        _syn("copy", "alibi", 0, {1: 1.0, 2: 0.9, 4: 0.1}),
    ]
    t = kazemnejad_ranks(recs)
    assert [r[:6] for r in t.rows] == [
        ["rope", "4", "1.00", "1.00", "1", "0.200"],
        ["alibi", "3", "2.00", "2.00", "1", "0.100"],
        ["none", "1", "did not learn", "-", "0", "did not learn (0.50)"],
    ]


def test_comparisons_use_the_chosen_rate_of_a_sweep():
    """A swept (task, encoding): only the runs at the rate with the best validation."""
    recs = [
        _syn("copy", "none", 0, {1: 1.0, 2: 1.0, 4: 0.9}, lr=1e-3, val=0.5),
        _syn("copy", "none", 0, {1: 1.0, 2: 1.0, 4: 0.1}, lr=3e-3, val=0.9),  # chosen
        _syn("copy", "rope", 0, {1: 1.0, 2: 1.0, 4: 0.2}),
    ]
    t = kazemnejad_ranks(recs)
    assert [r[:3] + r[5:] for r in t.rows] == [["rope", "4", "1.00", "0.200"], ["none", "1", "2.00", "0.100"]]


def test_randpos_gain_is_paired_by_seed():
    recs = [
        _syn("copy", "rope", 0, {1: 1.0, 2: 1.0, 4: 0.2, 8: 0.0, 16: 0.0}),
        _syn("copy", "rope", 1, {1: 1.0, 2: 0.8, 4: 0.4, 8: 0.0, 16: 0.0}),
        _syn("copy", "rope+randpos", 0, {1: 1.0, 2: 1.0, 4: 0.6, 8: 0.2, 16: 0.0}),
        _syn("copy", "rope+randpos", 1, {1: 1.0, 2: 1.0, 4: 0.6, 8: 0.4, 16: 0.2}),
        _syn("copy", "alibi", 0, {1: 1.0, 2: 1.0, 4: 0.2, 8: 0.0, 16: 0.0}),  # no randpos twin: no row
    ]
    t = randpos_table(recs)
    assert len(t.rows) == 1
    row = dict(zip(t.columns, t.rows[0], strict=True))
    assert row["task"] == "copy" and row["encoding"] == "rope" and row["seeds"] == "2"
    # 1..L: plain (1.0, 0.9), randpos (1.0, 1.0): gains 0.0, 0.1
    assert (row["1..L plain"], row["1..L +randpos"], row["1..L gain"]) == ("0.95 ± 0.07", "1.00 ± 0.00", "0.05 ± 0.07")
    # (L, 2L]: plain 0.2, 0.4; randpos 0.6, 0.6 -> gains 0.4, 0.2
    assert row["(L, 2L] gain"] == "0.30 ± 0.14"
    # (2L, 8L]: plain 0, 0; randpos mean(0.2, 0) = 0.1, mean(0.4, 0.2) = 0.3
    assert row["(2L, 8L] +randpos"] == "0.20 ± 0.14"
    assert row["did not learn (exact match 1..L < 0.9)"] == "-"


def test_randpos_pairs_only_seeds_on_which_both_runs_learned():
    recs = [
        _syn("copy", "rope", 0, {1: 1.0, 2: 1.0, 4: 0.2}),
        _syn("copy", "rope", 1, {1: 0.5, 2: 0.5, 4: 0.0}),  # plain seed 1 did not learn
        _syn("copy", "rope", 2, {1: 1.0, 2: 1.0, 4: 0.4}),
        _syn("copy", "rope+randpos", 0, {1: 1.0, 2: 1.0, 4: 0.6}),
        _syn("copy", "rope+randpos", 1, {1: 1.0, 2: 1.0, 4: 0.9}),
        _syn("copy", "rope+randpos", 2, {1: 0.8, 2: 0.8, 4: 0.9}),  # randpos seed 2 did not learn
    ]
    t = randpos_table(recs)
    row = dict(zip(t.columns, t.rows[0], strict=True))
    assert row["seeds"] == "1" and row["(L, 2L] gain"] == "0.40"  # seed 0 alone: 0.6 - 0.2
    assert row["did not learn (exact match 1..L < 0.9)"] == "plain s1 (0.50); +randpos s2 (0.80)"
    none = randpos_table([r for r in recs if r["seed"] != 0])
    assert none.rows[0][2:6] == ["0", "-", "-", "-"]


def test_nothing_to_compare_gives_no_tables():
    assert published_tables([_syn("copy", "binary", 0, {1: 1.0, 2: 1.0, 4: 0.5})]) == []


def test_randpos_on_text_pairs_seeds_and_gives_ratios():
    recs = [
        _lm("rope", 0, {10: 5.0, 20: 10.0, 40: 20.0}),
        _lm("rope", 1, {10: 4.0, 20: 6.0, 40: 8.0}),
        _lm("rope", 2, {10: 4.0, 20: 6.0, 40: 8.0}),  # no randpos twin for seed 2: left out
        _lm("rope+randpos", 0, {10: 6.0, 20: 6.0, 40: 6.0}),
        _lm("rope+randpos", 1, {10: 5.0, 20: 5.5, 40: 6.0}),
        _lm("alibi", 0, {10: 5.0, 20: 5.0, 40: 5.0}),  # no randpos twin: no row
    ]
    t = randpos_lm_table(recs)
    assert t.columns == ["task", "encoding", "seeds", "ppl at L", "2L ratio", "4L ratio"]
    # pooled over the two seeds (geometric means), intervals between the two seeds' values:
    # ppl at L: plain 5, 4 -> sqrt(20); randpos 6, 5 -> sqrt(30)
    # 2L: plain 2.0, 1.5 -> sqrt(3); randpos 1.0, 1.1. 4L: plain 4.0, 2.0 -> sqrt(8); randpos 1.0, 1.2
    assert t.rows == [
        [
            "shakespeare",
            "rope",
            "2",
            "4.47 [4.00, 5.00] → 5.48 [5.00, 6.00]",
            "1.73 [1.50, 2.00] → 1.05 [1.00, 1.10]",
            "2.83 [2.00, 4.00] → 1.10 [1.00, 1.20]",
        ]
    ]
    assert randpos_lm_table([r for r in recs if "randpos" not in r["encoding"]]) is None
