"""The study's table cells with 95% intervals, recomputed from the records' counts.

Every cell pools the runs (seeds) of one task, encoding and test length at the learning
rate the sweep chose (``summary.selected``):

* synthetic tasks: exact match, only the runs that learned in distribution
  (``summary.learned``: exact match over lengths ``1..L`` at least ``LEARNED_BAR``); the
  estimate is the mean rate over those runs and the interval the two-stage bootstrap
  ``stats.pooled_ci`` (runs, then each run's ``samples`` test examples from its
  ``exact_hits``). Where every pooled run scored the same 0 or 1, each resample equals
  the data, so the interval is Wilson's of the pooled count (``stats.wilson_ci``). An
  encoding with no run that learned has the row "did not learn" and no number.
* corpora: perplexity with sliding windows (stride ``E/4``); the estimate is
  ``exp(total NLL / total scored tokens)`` over the runs and the interval the two-stage
  block bootstrap ``stats.pooled_ppl_ci`` over runs and their test segments
  (``nll_sliding_segments``, ``segment_tokens`` per segment). Language-modelling runs
  have no in-distribution bar, so every selected run counts.

Efron & Tibshirani 1993 (the percentile bootstrap); Kunsch 1989 (the block bootstrap).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from posenc.experiments.stats import RESAMPLES, paired_ppl_draws, pooled_ci, pooled_ppl_ci, wilson_ci
from posenc.experiments.summary import TableData, group, is_lm, learned, selected

#: The intervals' coverage.
LEVEL = 0.95


def rate_interval(
    runs: list[tuple[int, int]], *, level: float = LEVEL, resamples: int = RESAMPLES
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of the mean rate over ``runs`` (one ``(hits, n)`` per run):
    ``pooled_ci``, or Wilson's interval of the pooled count where every run has the same
    rate 0 or 1 (the bootstrap is degenerate there)."""
    if not runs:
        raise ValueError("runs must hold at least one (hits, n) pair")
    estimate = statistics.fmean(h / n for h, n in runs)
    if estimate in (0.0, 1.0):
        lo, hi = wilson_ci(sum(h for h, _ in runs), sum(n for _, n in runs), level=level)
    else:
        lo, hi = pooled_ci(runs, level=level, resamples=resamples, seed=0)
    return estimate, lo, hi


def ppl_interval(
    runs: list[tuple[list[float], int]], *, level: float = LEVEL, resamples: int = RESAMPLES
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of the perplexity of all tokens of ``runs`` (one
    ``(nll_segments, segment_tokens)`` per run) with ``pooled_ppl_ci``'s interval."""
    if not runs:
        raise ValueError("runs must hold at least one (nll_segments, segment_tokens) pair")
    nll = sum(sum(segments) for segments, _ in runs)
    tokens = sum(len(segments) * size for segments, size in runs)
    lo, hi = pooled_ppl_ci(runs, level=level, resamples=resamples, seed=0)
    return math.exp(nll / tokens), lo, hi


def ppl_ratio_interval(
    pairs: list[tuple[tuple[list[float], int], tuple[list[float], int]]],
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of the ratio of two pooled perplexities ``a / b`` scored on
    the same test segments (two lengths of one model, or two models): ``pairs`` is one
    ``((nll_segments_a, segment_tokens_a), (nll_segments_b, segment_tokens_b))`` per run;
    the interval is the paired two-stage block bootstrap of ``stats.paired_ppl_draws``
    (the same runs and segments on both sides)."""
    if not pairs:
        raise ValueError("pairs must hold at least one ((nll_a, tokens_a), (nll_b, tokens_b)) per run")
    runs = [list(pair) for pair in pairs]
    draws = paired_ppl_draws(runs, resamples=resamples, seed=0)  # [resamples, 2]
    pooled = [
        sum(sum(run[i][0]) for run in runs) / sum(len(run[i][0]) * run[i][1] for run in runs) for i in (0, 1)
    ]  # mean NLL per token of a and of b
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws[:, 0] / draws[:, 1], [tail, 1.0 - tail])
    return math.exp(pooled[0] - pooled[1]), float(lo), float(hi)


#: Per perplexity metric, the metrics entry's per-segment NLLs it is computed from.
SEGMENTS = {"ppl": "nll_segments", "ppl_sliding": "nll_sliding_segments"}
#: The counts each kind of metrics entry needs for its interval.
_COUNTS = {"lm": ("nll_sliding_segments", "segment_tokens"), "synthetic": ("exact_hits", "samples")}


def _has_counts(record: dict[str, Any]) -> bool:
    need = _COUNTS["lm" if is_lm([record]) else "synthetic"]
    return all(k in m for m in record["metrics"] for k in need)


def without_counts(records: list[dict[str, Any]]) -> list[str]:
    """The tasks of ``selected(records)`` with a record that lacks the counts an interval
    needs (records of an earlier posenc): ``interval_tables`` leaves them out."""
    return [
        t
        for t, by_enc in group(selected(records)).items()
        if not all(_has_counts(r) for recs in by_enc.values() for r in recs)
    ]


def fmt_interval(cell: tuple[float, float, float], digits: int = 2) -> str:
    """``estimate [lo, hi]``: the one format of a cell with its interval."""
    est, lo, hi = cell
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def interval_tables(
    records: list[dict[str, Any]], *, level: float = LEVEL, resamples: int = RESAMPLES
) -> list[TableData]:
    """One table per task of ``selected(records)``: rows = encodings, columns = the
    number of runs pooled and every test length from ``L`` on, cells ``estimate [lo, hi]``
    (exact match of the runs that learned / sliding-window perplexity, see the module
    docstring; ``TableData.metric`` names which). Tasks in ``without_counts(records)`` are left out. ``TableData.cells``
    stays empty: the cells are text."""
    out = []
    pct = f"{level:.0%}"
    skip = set(without_counts(records))
    for task, by_enc in group(selected(records)).items():
        if task in skip:
            continue
        first = next(iter(by_enc.values()))[0]
        L = first["train_length"]
        lengths = [m["length"] for m in first["metrics"] if m["length"] >= L]
        rows = []
        if is_lm([first]):
            for enc, recs in by_enc.items():
                by_len = [{m["length"]: m for m in r["metrics"]} for r in recs]
                cells = [
                    ppl_interval(
                        [(m[n]["nll_sliding_segments"], m[n]["segment_tokens"]) for m in by_len],
                        level=level,
                        resamples=resamples,
                    )
                    for n in lengths
                ]
                rows.append([enc, str(len(recs)), *(fmt_interval(c) for c in cells)])
            title = (
                f"{task}: perplexity with sliding windows, trained at L={L}, with {pct} intervals (block "
                "bootstrap over runs and test segments; the chosen rate's runs)"
            )
            out.append(
                TableData(title, ["encoding", "runs", *map(str, lengths)], rows, task=task, metric="ppl_sliding")
            )
            continue
        for enc, recs in by_enc.items():
            kept = [r for r in recs if learned(r)]
            if not kept:
                rows.append([enc, f"0 of {len(recs)}", *(["did not learn"] + ["–"] * (len(lengths) - 1))])
                continue
            by_len = [{m["length"]: m for m in r["metrics"]} for r in kept]
            cells = [
                rate_interval([(m[n]["exact_hits"], m[n]["samples"]) for m in by_len], level=level, resamples=resamples)
                for n in lengths
            ]
            rows.append([enc, f"{len(kept)} of {len(recs)}", *(fmt_interval(c) for c in cells)])
        title = (
            f"{task}: exact match trained on 1..{L}, with {pct} intervals (runs that learned in distribution at "
            "the chosen rate; bootstrap over runs and test examples, Wilson's interval where every run scored "
            "0 or every run 1)"
        )
        out.append(
            TableData(title, ["encoding", "runs learned", *map(str, lengths)], rows, task=task, metric="exact_match")
        )
    return out
