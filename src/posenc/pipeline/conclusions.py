"""A study's conclusions in sentences, with their numbers, from its records (the
report's step 7): per task what holds at L and what breaks past it, the runs that did
not learn, and the mean ranks beside Kazemnejad et al.'s order.

Only ``selected(records)`` count (one learning rate per task and encoding after a
sweep). On synthetic tasks, who is best past L is said only among the runs that learned
the task in distribution (``summary.learned``); the encodings none of whose runs learned
it are named as "did not learn" with their exact match over 1..L, and the mean ranks
are ``mean_ranks``' (gated the same way). The exact match over 1..L itself is compared
over every run: it is the measure of learning, not of generalization. Language-modelling
sentences are not gated (no bar is defined for them)."""

from __future__ import annotations

import statistics
from typing import Any

from posenc.experiments.intervals import ppl_interval, rate_interval
from posenc.experiments.published import KAZEMNEJAD_ORDER
from posenc.experiments.summary import (
    LEARNED_BAR,
    group,
    in_distribution,
    is_lm,
    learned,
    mean_ranks,
    not_learned,
    not_learned_note,
    selected,
    sweep_table,
)


def _at(recs: list[dict[str, Any]], length: int, key: str) -> float | None:
    vals = [m[key] for r in recs for m in r["metrics"] if m["length"] == length and key in m]
    return statistics.fmean(vals) if vals else None


def _listing(scores: list[tuple[str, float]], digits: int = 2) -> str:
    return ", ".join(f"{e} {v:.{digits}f}" for e, v in scores)


def _ends(scores: list[tuple[str, float]]) -> str:
    """Best and worst of ``scores`` (sorted best first), ties said as ties."""
    if len(scores) == 1:
        return _listing(scores)
    top, low = round(scores[0][1], 2), round(scores[-1][1], 2)
    if top == low:
        return f"every encoding {top:.2f}"
    best = [e for e, v in scores if round(v, 2) == top]
    worst = [e for e, v in scores if round(v, 2) == low]

    def say(g, v):
        return f"{', '.join(g)} {v:.2f}" if len(g) <= 2 else f"{len(g)} encodings tie at {v:.2f}"

    return f"{say(best, top)} best, {say(worst, low)} worst"


def _interval(recs: list[dict[str, Any]], length: int, lm: bool) -> str:
    """`` [lo, hi]``: the 95% interval of ``recs``' score at ``length`` (exact match of
    the runs, or non-overlapping perplexity; ``posenc.experiments.intervals``), or ""
    where a record lacks the counts."""
    entries = [next((m for m in r["metrics"] if m["length"] == length), None) for r in recs]
    need = ("nll_segments", "segment_tokens") if lm else ("exact_hits", "samples")
    if any(m is None or any(k not in m for k in need) for m in entries):
        return ""
    if lm:
        _, lo, hi = ppl_interval([(m["nll_segments"], m["segment_tokens"]) for m in entries])
    else:
        _, lo, hi = rate_interval([(m["exact_hits"], m["samples"]) for m in entries])
    return f" [{lo:.2f}, {hi:.2f}]"


def _best_interval(scores: list[tuple[str, float]], by_enc: dict[str, list[dict[str, Any]]], n: int, lm: bool) -> str:
    """The 95% interval of the single best of ``scores`` at length ``n``, as a clause."""
    if len(scores) < 2 or round(scores[0][1], 2) == round(scores[1][1], 2):
        return ""
    ci = _interval(by_enc[scores[0][0]], n, lm)
    return f" (95% interval of {scores[0][0]}:{ci})" if ci else ""


def _unlearned_note(records: list[dict[str, Any]], unlearned: list[dict[str, Any]]) -> str:
    """``not_learned_note`` counted per task when it would list more than 10 runs."""
    if len(unlearned) <= 10:
        return not_learned_note(unlearned)
    per_task = {}
    for task, by_enc in group(records).items():
        n = sum(r in unlearned for recs in by_enc.values() for r in recs)
        if n:
            per_task[task] = f"{task} {n} of {sum(len(v) for v in by_enc.values())}"
    return (
        f"{len(unlearned)} of {len(records)} runs did not learn in distribution (exact match over lengths 1..L below "
        f"{LEARNED_BAR}): {', '.join(per_task.values())} (results.md names them). Their scores past L say "
        "nothing about generalization; no rank or comparison past L uses them."
    )


def task_sentence(task: str, by_enc: dict[str, list[dict[str, Any]]]) -> str | None:
    """One sentence for one task: the best and worst encodings at L and past it (past L on
    a synthetic task: over the runs that learned it; the others named after)."""
    first = next(iter(by_enc.values()))
    L = first[0]["train_length"]
    lengths = sorted({m["length"] for recs in by_enc.values() for r in recs for m in r["metrics"]})
    longer = [n for n in lengths if n > L]
    seeds = max(len(v) for v in by_enc.values())
    head = f"{task} (trained at L = {L}, {seeds} seed{'s' * (seeds != 1)}): "
    if is_lm(first):
        at_l = sorted(
            ((e, v) for e, recs in by_enc.items() if (v := _at(recs, L, "ppl")) is not None), key=lambda x: x[1]
        )
        if not at_l or not longer:
            return None
        far = longer[-1]
        ratios = []
        for e, recs in by_enc.items():
            v, base = _at(recs, far, "ppl"), _at(recs, L, "ppl")
            if v is not None and base:
                ratios.append((e, v / base))
        ratios.sort(key=lambda x: x[1])
        return (
            head + f"perplexity at L from {_listing(at_l[:1])} (best){_best_interval(at_l, by_enc, L, True)} to "
            f"{_listing(at_l[-1:])} (worst); at {far} "
            f"tokens ({far // L}L) it is multiplied by {_listing(ratios[:3])} for the best and "
            f"{_listing(ratios[-2:])} for the worst (ppl({far}) / ppl(L))."
        )
    inside = sorted(
        ((e, statistics.fmean(in_distribution(r) for r in recs)) for e, recs in by_enc.items()), key=lambda x: -x[1]
    )
    parts = [f"exact match over lengths 1..L: {_ends(inside)}"]
    ok = {e: kept for e, recs in by_enc.items() if (kept := [r for r in recs if learned(r)])}
    for n in [n for n in longer if n in (2 * L, longer[-1])]:
        scores = sorted(
            ((e, v) for e, recs in ok.items() if (v := _at(recs, n, "exact_match")) is not None),
            key=lambda x: -x[1],
        )
        if scores:
            parts.append(f"at {n} ({n / L:g}L): {_ends(scores)}{_best_interval(scores, ok, n, False)}")
    failed = [(e, v) for e, v in inside if e not in ok]
    tail = f" Did not learn in distribution (not compared past L): {_listing(failed)}." if failed else ""
    return head + "; ".join(parts) + "." + tail


def study_conclusions(records: list[dict[str, Any]]) -> list[str]:
    """The study's conclusions as sentences (numbers: means over seeds; the single best
    encoding past L, or at L on a corpus, with its 95% interval where the records carry
    counts), after the learning-rate sweep's choice when the study swept."""
    sweep = sweep_table(records)
    records = selected(records)
    out = [s for task, by_enc in group(records).items() if (s := task_sentence(task, by_enc))]
    if sweep is not None:
        col, at = sweep.columns.index("chosen lr"), sweep.columns.index("chosen at")
        chosen: dict[str, int] = {}
        for row in sweep.rows:
            chosen[row[col]] = chosen.get(row[col], 0) + 1
        edge = sum(row[at] != "inside" for row in sweep.rows)
        out.insert(
            0,
            f"Learning rates chosen on the in-distribution validation score of each task and encoding's sweep "
            f"({', '.join(c.removeprefix('lr ') for c in sweep.columns[4:col])}; never the test lengths): "
            + ", ".join(f"{lr} for {n}" for lr, n in sorted(chosen.items(), key=lambda kv: float(kv[0])))
            + f" of {len(sweep.rows)} pairs ({edge} at the lowest or highest rate tried, where the best rate may "
            "lie outside the grid); every other sentence uses only the chosen rate's runs.",
        )
    unlearned = not_learned(records)
    if unlearned:
        out.append(_unlearned_note(records, unlearned))
    ranks = mean_ranks(records)
    if ranks is not None and ranks.rows:
        order = ", ".join(
            f"{row[0]} ({row[1]}, {row[3]} task{'s' * (row[3] != '1')})" for row in ranks.rows if row[3] != "0"
        )
        never = [row[0] for row in ranks.rows if row[3] == "0"]
        sentence = (
            f"Mean rank by token accuracy on lengths (L, 2L] over the synthetic tasks, among the runs that learned "
            f"each task in distribution (1 = best; tasks ranked in brackets): {order or 'none'}."
        )
        if never:
            sentence += f" Not ranked (learned no task): {', '.join(never)}."
        out.append(
            sentence + f" Kazemnejad et al. 2023 found {', '.join(KAZEMNEJAD_ORDER)} (APE played by sinusoidal here)."
        )
    return out
