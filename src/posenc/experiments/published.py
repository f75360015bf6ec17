"""The study's results set beside three published findings: the text comparisons (Press, Ruoss
on text) pooled over seeds with 95% intervals (``intervals``), the synthetic Ruoss table
as mean ± std over seeds (token accuracy has no per-example counts for an interval).

* Press et al. 2022 ("Train Short, Test Long", arXiv:2108.12409), Table 2: perplexity
  at an evaluation length E divided by the perplexity at the training length L
  (non-overlapping evaluation) for sinusoidal, rotary, T5 and ALiBi at E ≈ 2L and ≈ 5L.
* Kazemnejad et al. 2023 ("The Impact of Positional Encoding on Length Generalization in
  Transformers", arXiv:2305.19466): on synthetic tasks, evaluated up to about 2L, the
  mean rank is NoPE best, then T5, ALiBi, RoPE, and absolute embeddings (APE) last.
* Ruoss et al. 2023 ("Randomized Positional Encodings Boost Length Generalization of
  Transformers", arXiv:2305.16843): training with sorted random positions from a range
  longer than the training length improves accuracy past it.

Each function returns ``TableData`` (``posenc.experiments.summary``) or ``None`` when the
records lack what it needs (the text tables leave out a corpus whose records lack the
per-segment NLL of an interval, ``intervals.without_counts``, as the interval tables do).
Nothing here is tuned to match: the paper values are
constants for display only. Every function reads ``summary.selected(records)`` (one
learning rate per task and encoding when the study swept it). The synthetic comparisons
(Kazemnejad, Ruoss) use only runs that learned their task in distribution
(``summary.learned``: exact match over lengths 1..L >= ``LEARNED_BAR``) and name the
others "did not learn"; the language-modelling ones (Press, Ruoss on text) are not gated.
"""

from __future__ import annotations

import statistics
from typing import Any

from posenc.experiments.config import RANDPOS
from posenc.experiments.intervals import SEGMENTS, fmt_interval, ppl_interval, ppl_ratio_interval, without_counts
from posenc.experiments.summary import (
    LEARNED_BAR,
    Cell,
    TableData,
    group,
    in_distribution,
    is_lm,
    learned,
    mean_ranks,
    selected,
)

#: Press et al. 2022, Table 2 (WikiText-103, L = 512): ppl(E) / ppl(L) at E ≈ 2L and ≈ 5L.
PRESS_TABLE2: dict[str, tuple[float, float]] = {
    "sinusoidal": (2.2, 6.6),
    "rope": (1.06, 1.57),
    "t5": (0.96, 1.04),
    "alibi": (0.95, 0.93),
}
#: Kazemnejad et al. 2023's order (best first); "APE" is played by ``sinusoidal`` here.
KAZEMNEJAD_ORDER: tuple[str, ...] = ("none", "t5", "alibi", "rope", "sinusoidal")


def _press(records: list[dict[str, Any]], key: str) -> list[tuple[str, int, int, list[list[str]]]]:
    """Per language-modelling task with an encoding of ``PRESS_TABLE2``: ``(task, L,
    seeds, rows)``, each row the paper's ratios beside ours, ``key(E) / key(L)`` at 2L, 4L
    and 8L, and our ``key`` at L: perplexities pooled over the seeds with 95% intervals
    (``intervals.ppl_ratio_interval``: paired over seeds and test segments, the same
    segments at every length; ``intervals.ppl_interval``)."""
    segments = SEGMENTS[key]
    out, skip = [], set(without_counts(records))
    for task, by_enc in group(selected(records)).items():
        first = next(iter(by_enc.values()))
        if not is_lm(first) or not any(e in by_enc for e in PRESS_TABLE2) or task in skip:
            continue
        L = first[0]["train_length"]
        lengths = {m["length"] for m in first[0]["metrics"]}
        factors = [f for f in (2, 4, 8) if f * L in lengths]
        rows = []
        for enc, (p2, p5) in PRESS_TABLE2.items():
            recs = by_enc.get(enc)
            if not recs:
                continue
            by_len = [{m["length"]: (m[segments], m["segment_tokens"]) for m in r["metrics"]} for r in recs]
            ours = {f: fmt_interval(ppl_ratio_interval([(m[f * L], m[L]) for m in by_len])) for f in factors}
            at_l = fmt_interval(ppl_interval([m[L] for m in by_len]))
            rows.append([enc, f"{p2:g}", ours.get(2, "-"), f"{p5:g}", ours.get(4, "-"), ours.get(8, "-"), at_l])
        out.append((task, L, max(len(v) for v in by_enc.values()), rows))
    return out


_PRESS_COLUMNS = ["encoding", "paper ~2L", "ours 2L", "paper ~5L", "ours 4L", "ours 8L"]


def press_table(records: list[dict[str, Any]]) -> list[TableData]:
    """One table per language-modelling task: the paper's ratios next to ours at 2L,
    4L and 8L (pooled over seeds, 95% intervals), non-overlapping evaluation as in the paper, and
    our perplexity at L."""
    return [
        TableData(
            f"Press et al. 2022 Table 2 vs {task} (L={L}, {n} seed{'s' * (n != 1)}): ppl(E) / ppl(L), pooled over "
            "seeds with 95% intervals",
            [*_PRESS_COLUMNS, "ours ppl at L"],
            rows,
        )
        for task, L, n, rows in _press(records, "ppl")
    ]


def press_sliding_table(records: list[dict[str, Any]]) -> list[TableData]:
    """Press et al. 2022's encodings with sliding-window evaluation, per corpus: the
    ratio ``ppl_sliding(E) / ppl_sliding(L)`` at 2L, 4L and 8L (pooled, 95% intervals)
    beside the paper's non-overlapping ratios. Their appendix B reads ratios below 1 under
    non-overlapping evaluation as the early-token curse (a longer chunk has a smaller share
    of tokens with little context); sliding windows give every scored token at least
    ``3E/4`` tokens of context, so an encoding that extrapolates is flat here (ratio 1)."""
    return [
        TableData(
            f"Press et al. 2022 Table 2 vs {task} with sliding windows (L={L}, {n} seed{'s' * (n != 1)}): "
            "ppl_sliding(E) / ppl_sliding(L), pooled over seeds with 95% intervals; the paper's ratios are "
            "non-overlapping",
            [*_PRESS_COLUMNS, "ours sliding ppl at L"],
            rows,
        )
        for task, L, n, rows in _press(records, "ppl_sliding")
    ]


def kazemnejad_ranks(records: list[dict[str, Any]], factor: int = 2) -> TableData | None:
    """``mean_ranks`` over the encodings Kazemnejad et al. compare (those present), with
    the paper's rank next to each; gated like ``mean_ranks`` (an encoding that learned no
    task has the mean rank "did not learn")."""
    chosen = [r for r in records if r["encoding"] in KAZEMNEJAD_ORDER]
    table = mean_ranks(chosen, factor=factor)
    if table is None:
        return None
    paper = {enc: str(i + 1) for i, enc in enumerate(KAZEMNEJAD_ORDER)}
    rows = [[row[0], paper[row[0]], *row[1:]] for row in table.rows]
    title = f"Kazemnejad et al. 2023 vs this study: {table.title}"
    return TableData(title, [table.columns[0], "paper rank", *table.columns[1:]], rows)


def _window(record: dict[str, Any], lo: int, hi: int, key: str, metrics: str = "metrics") -> float | None:
    """Mean of ``key`` over lengths ``lo * L < n <= hi * L`` of ``record[metrics]``."""
    L = record["train_length"]
    vals = [m[key] for m in record[metrics] if lo * L < m["length"] <= hi * L]
    return statistics.fmean(vals) if vals else None


def _unlearned(runs: dict[int, dict[str, Any]], seeds: list[int], label: str) -> list[str]:
    return [f"{label} s{s} ({in_distribution(runs[s]):.2f})" for s in seeds if not learned(runs[s])]


def randpos_table(records: list[dict[str, Any]], key: str = "token_accuracy") -> TableData | None:
    """Ruoss et al. 2023: for every synthetic task and encoding trained both ways, ``key``
    in distribution (1..L) and past it ((L, 2L] and (2L, 8L]) without and with randomized
    positions, and the gain (randpos − plain, paired by seed: mean ± std). Randomized runs
    are scored as Ruoss et al. do, at randomized test positions (``summary.judged``); the
    column "(L, 2L] +randpos at 0..s-1" gives the same runs at positions ``0..s-1`` where
    the records have both. Only seeds on which both runs learned the task in distribution
    are paired ("seeds"); the runs that did not learn are named in the last column with
    their exact match over 1..L."""
    rows = []
    for task, by_enc in group(selected(records)).items():
        first = next(iter(by_enc.values()))
        if is_lm(first):
            continue
        for enc in by_enc:
            if enc.endswith(RANDPOS) or enc + RANDPOS not in by_enc:
                continue
            plain = {r["seed"]: r for r in by_enc[enc]}
            rand = {r["seed"]: r for r in by_enc[enc + RANDPOS]}
            both = sorted(set(plain) & set(rand))
            if not both:
                continue
            failed = _unlearned(plain, both, "plain") + _unlearned(rand, both, "+randpos")
            seeds = [s for s in both if learned(plain[s]) and learned(rand[s])]
            row = [task, enc, str(len(seeds))]
            for lo, hi in ((0, 1), (1, 2), (2, 8)):
                a = [_window(plain[s], lo, hi, key) for s in seeds]
                b = [_window(rand[s], lo, hi, key) for s in seeds]
                if not seeds or None in a or None in b:
                    row += ["-", "-", "-"]
                    continue
                row += [
                    Cell.of(a).fmt(2),
                    Cell.of(b).fmt(2),
                    Cell.of([y - x for x, y in zip(a, b, strict=True)]).fmt(2),
                ]
            fixed = [_window(rand[s], 1, 2, key, "metrics_arange") for s in seeds if "metrics_arange" in rand[s]]
            row.append(Cell.of(fixed).fmt(2) if fixed and len(fixed) == len(seeds) and None not in fixed else "-")
            rows.append([*row, "; ".join(failed) or "-"])
    if not rows:
        return None
    cols = ["task", "encoding", "seeds"]
    for w in ("1..L", "(L, 2L]", "(2L, 8L]"):
        cols += [f"{w} plain", f"{w} +randpos", f"{w} gain"]
    cols.append("(L, 2L] +randpos at 0..s-1")
    cols.append(f"did not learn (exact match 1..L < {LEARNED_BAR})")
    return TableData(
        f"Ruoss et al. 2023: randomized positions, {key}, mean ± std over seeds (+randpos scored at randomized "
        "test positions as in the paper; gain = +randpos − plain, paired by seed; only seeds on which both runs "
        "learned in distribution)",
        cols,
        rows,
    )


def _ppl_or_ratio(records: list[dict[str, Any]], length: int) -> str:
    """Perplexity at the training length, ``ppl(length) / ppl(L)`` past it, pooled over
    ``records`` (one per seed) with the 95% interval of ``intervals``."""
    L = records[0]["train_length"]
    by_len = [{m["length"]: (m["nll_segments"], m["segment_tokens"]) for m in r["metrics"]} for r in records]
    if length == L:
        return fmt_interval(ppl_interval([m[L] for m in by_len]))
    return fmt_interval(ppl_ratio_interval([(m[length], m[L]) for m in by_len]))


def randpos_lm_table(records: list[dict[str, Any]]) -> TableData | None:
    """Ruoss et al. 2023's question on language modelling (the paper has only synthetic
    tasks): for every corpus and encoding trained both ways, perplexity at L and the
    ratio ppl(E) / ppl(L) at every longer E, plain -> randpos (non-overlapping, pooled
    over the seeds that both have, with 95% intervals: ``_ppl_or_ratio``)."""
    rows, skip = [], set(without_counts(records))
    for task, by_enc in group(selected(records)).items():
        first = next(iter(by_enc.values()))
        if not is_lm(first) or task in skip:
            continue
        L = first[0]["train_length"]
        longer = [m["length"] for m in first[0]["metrics"] if m["length"] > L]
        for enc in by_enc:
            if enc.endswith(RANDPOS) or enc + RANDPOS not in by_enc:
                continue
            plain = {r["seed"]: r for r in by_enc[enc]}
            rand = {r["seed"]: r for r in by_enc[enc + RANDPOS]}
            seeds = sorted(set(plain) & set(rand))
            if not seeds:
                continue
            row = [task, enc, str(len(seeds))]
            for n in (L, *longer):
                row.append(
                    f"{_ppl_or_ratio([plain[s] for s in seeds], n)} → {_ppl_or_ratio([rand[s] for s in seeds], n)}"
                )
            rows.append(row)
    if not rows:
        return None
    cols = ["task", "encoding", "seeds", "ppl at L", *(f"{n // L}L ratio" for n in longer)]
    title = (
        "Ruoss et al. 2023 on text: randomized positions, ppl at L and ppl(E) / ppl(L), plain → +randpos "
        "(pooled over seeds with 95% intervals)"
    )
    return TableData(title, cols, rows)


def published_tables(records: list[dict[str, Any]]) -> list[TableData]:
    """Every comparison the records allow, in the order above."""
    out = press_table(records) + press_sliding_table(records)
    for t in (kazemnejad_ranks(records), randpos_table(records), randpos_lm_table(records)):
        if t is not None:
            out.append(t)
    return out
