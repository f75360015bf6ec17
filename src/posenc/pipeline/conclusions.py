"""A study's conclusions in sentences, with their numbers, from its records (the
report's step 7): per task what holds at L and what breaks past it, the runs that did
not learn, and the mean ranks beside Kazemnejad et al.'s order."""

from __future__ import annotations

import statistics
from typing import Any

from posenc.experiments.published import KAZEMNEJAD_ORDER
from posenc.experiments.summary import (
    LEARNED_BAR,
    group,
    in_distribution,
    is_lm,
    mean_ranks,
    not_learned,
    not_learned_note,
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
        f"{LEARNED_BAR}): {', '.join(per_task.values())} (results.md names them). Their scores past L, and ranks "
        "that include them, say nothing about generalization."
    )


def task_sentence(task: str, by_enc: dict[str, list[dict[str, Any]]]) -> str | None:
    """One sentence for one task: the best and worst encodings at L and past it."""
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
            head + f"perplexity at L from {_listing(at_l[:1])} (best) to {_listing(at_l[-1:])} (worst); at {far} "
            f"tokens ({far // L}L) it is multiplied by {_listing(ratios[:3])} for the best and "
            f"{_listing(ratios[-2:])} for the worst (ppl({far}) / ppl(L))."
        )
    inside = sorted(
        ((e, statistics.fmean(in_distribution(r) for r in recs)) for e, recs in by_enc.items()), key=lambda x: -x[1]
    )
    parts = [f"exact match over lengths 1..L: {_ends(inside)}"]
    for n in [n for n in longer if n in (2 * L, longer[-1])]:
        scores = sorted(
            ((e, v) for e, recs in by_enc.items() if (v := _at(recs, n, "exact_match")) is not None),
            key=lambda x: -x[1],
        )
        if scores:
            parts.append(f"at {n} ({n / L:g}L): {_ends(scores)}")
    return head + "; ".join(parts) + "."


def study_conclusions(records: list[dict[str, Any]]) -> list[str]:
    """The study's conclusions as sentences (numbers: means over seeds)."""
    out = [s for task, by_enc in group(records).items() if (s := task_sentence(task, by_enc))]
    unlearned = not_learned(records)
    if unlearned:
        out.append(_unlearned_note(records, unlearned))
    ranks = mean_ranks(records)
    if ranks is not None and ranks.rows:
        order = ", ".join(f"{row[0]} ({row[1]})" for row in ranks.rows)
        out.append(
            f"Mean rank by token accuracy on lengths (L, 2L] over the synthetic tasks (1 = best): {order}. "
            f"Kazemnejad et al. 2023 found {', '.join(KAZEMNEJAD_ORDER)} (APE played by sinusoidal here)."
        )
    return out
