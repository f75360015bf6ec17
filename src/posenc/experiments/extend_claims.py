"""The published orderings of context extension, checked on an ``extension.json`` dict
with 95% intervals (Chen et al. 2023, Position Interpolation; Peng et al. 2023, YaRN;
bloc97 2023, NTK-aware scaling), at lengths ``E > L`` (``f L`` = the fine-tuning length,
``f`` its factor):

1. direct extrapolation fails: ``none`` zero-shot at ``E`` is worse than at ``L``;
2. PI zero-shot beats direct: ``linear`` zero-shot better than ``none`` zero-shot;
3. NTK-aware zero-shot beats PI zero-shot: ``ntk`` better than ``linear``;
4. after fine-tuning PI recovers most of the in-range metric (``E <= f L``): the recovery
   ``(none_zs(E) - linear_ft(E)) / (none_zs(E) - none_zs(L))`` is > 0.5
   (1 = back to the in-range value, > 1 = better than in range);
5. YaRN fine-tuned beats PI fine-tuned, both with factor ``f`` (Peng et al.'s Table 1
   judges its factor-2 models also past their factor);
6. corpora only: YaRN extrapolates past its fine-tuning length when its factor covers
   ``E`` (Peng et al.: the factor-32 model fine-tuned on 64k tokens, scored to 128k):
   ``yarn`` fine-tuned-covering at ``E > f L`` better than ``yarn`` fine-tuned at ``f L``;
7. synthetic tasks only: PI fine-tuning extends retrieval faster than direct
   fine-tuning (Chen et al.'s passkey retrieval, ``E <= f L``): ``linear`` fine-tuned
   better than ``none`` fine-tuned.

"Better" is lower perplexity (corpora) or higher exact match (synthetic tasks).

**Which runs.** A claim at a length uses the seeds where every record it reads kept the
task (``extend_summary.kept``: exact match at ``L`` >= 0.9 on synthetic tasks); where no
seed did, the claim is "not judged" there, never counted.

**The effect and its interval.** Corpora: the ratio of the pooled perplexities ``a / b``
with a paired two-stage block bootstrap (seeds with replacement, then test segments with
replacement, the same segments on both sides: every rule, stage and length is scored on
the same held-out text; ``stats.paired_ppl_draws``). Synthetic tasks: the difference of
the mean exact-match rates ``a - b``, seeds paired, each side's examples drawn
independently (``stats.paired_rate_draws``). Claim 4: the recovery, from the same draws
of its three cells. **The verdict**: "agrees" when the 95% interval lies strictly on the
claim's side (ratio < 1, difference > 0, recovery > 0.5; claim 1: ratio > 1, difference
< 0), "disagrees" when it lies strictly on the other side, "undecided" otherwise. The
seeds where the claim holds strictly (a tie is not agreement) are counted beside it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from posenc.experiments.extend_summary import (
    COUNTS,
    at_length,
    metric_keys,
    primary_metric,
    runs_by_stage,
    task_names,
    task_records,
)
from posenc.experiments.intervals import LEVEL, ppl_ratio_interval
from posenc.experiments.stats import RESAMPLES, paired_ppl_draws, paired_rate_draws
from posenc.experiments.summary import TableData

#: The published claims ``orderings`` checks, by number (Chen et al. 2023: 2, 4, 7;
#: bloc97 2023: 3; Peng et al. 2023: 5, 6).
CLAIMS = {
    1: "1. direct extrapolation fails (none zero-shot at E worse than at L)",
    2: "2. PI zero-shot beats direct (linear better than none)",
    3: "3. NTK-aware zero-shot beats PI zero-shot (ntk better than linear)",
    4: "4. PI fine-tuned recovers most of the in-range metric (recovery > 0.5; E <= fine-tuning length)",
    5: "5. YaRN fine-tuned beats PI fine-tuned (both with the fine-tune's factor)",
    6: "6. YaRN extrapolates past its fine-tuning length (factor covering E: better at E than at fine-tuning length)",
    7: "7. PI fine-tuning extends retrieval faster than direct fine-tuning (linear fine-tuned better than none)",
}


def _counts(key: str, m: dict[str, Any]) -> tuple:
    return (m["exact_hits"], m["samples"]) if key == "exact_match" else (m[COUNTS[key]], m["segment_tokens"])


def _pooled(key: str, terms: list[list[tuple]]) -> np.ndarray:
    """The pooled value of each term over the seeds: ``[terms]`` (one list of counts per seed)."""
    if key == "exact_match":
        return np.mean([[h / n for h, n in seed] for seed in terms], axis=0)
    nll = np.array([[sum(segments) for segments, _ in seed] for seed in terms])  # [seeds, terms]
    tokens = np.array([[len(segments) * size for segments, size in seed] for seed in terms])  # [seeds, terms]
    return np.exp(nll.sum(axis=0) / tokens.sum(axis=0))


def _draws(key: str, terms: list[list[tuple]]) -> np.ndarray:
    draw = paired_rate_draws if key == "exact_match" else paired_ppl_draws
    return draw(terms, resamples=RESAMPLES, seed=0)  # [resamples, terms]


def _verdict(lo: float, hi: float, threshold: float, side: int) -> str:
    if (lo > threshold and side > 0) or (hi < threshold and side < 0):
        return "agrees"
    if (hi < threshold and side > 0) or (lo > threshold and side < 0):
        return "disagrees"
    return "undecided"


def judge(
    key: str, terms: list[list[tuple]], stat: Callable[[np.ndarray], np.ndarray], threshold: float, side: int
) -> dict[str, Any]:
    """``est``, ``lo``, ``hi`` of ``stat`` (``[n, terms] -> [n]``) over the seeds' ``terms``
    (one list of counts per seed, see ``_counts``) and the ``verdict`` against
    ``threshold`` (``side`` +1: the claim says the effect is above it, -1 below)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a recovery with no gap to recover is nan
        est = float(stat(_pooled(key, terms)[None, :])[0])
        effect = stat(_draws(key, terms))
    if not np.isfinite(effect).all() or not np.isfinite(est):  # some draw has no gap to recover
        return {"est": est, "lo": float("nan"), "hi": float("nan"), "verdict": "undecided"}
    tail = (1.0 - LEVEL) / 2.0
    lo, hi = (float(x) for x in np.quantile(effect, [tail, 1.0 - tail]))
    return {"est": est, "lo": lo, "hi": hi, "verdict": _verdict(lo, hi, threshold, side)}


def orderings(data: dict[str, Any], task: str, key: str | None = None) -> list[dict[str, Any]]:
    """The published claims at every length ``E > L`` by ``key`` (default the task's
    primary metric), one dict per claim and length: ``claim``, ``number``, ``length``,
    ``of`` (seeds with both records), ``seeds`` (those that kept the task on every
    record the claim reads), ``holds`` / ``ties`` (seeds where it holds strictly / ties),
    ``effect`` (``ratio``, ``difference`` or ``recovery``), ``est``, ``lo``, ``hi``,
    ``verdict`` (module docstring). Claims 4 and 7 are checked where the fine-tune's
    factor covers ``E``, claim 6 past it; claim 6 only on corpora, claim 7 only on
    synthetic tasks."""
    key = key or primary_metric(data, task)
    lm = key.startswith("ppl")
    every, good = runs_by_stage(data, task, only_kept=False), runs_by_stage(data, task)
    recs = task_records(data, task)
    L = recs[0]["train_length"]
    lengths = sorted({m["length"] for r in recs for m in r["metrics"] if m["length"] > L})
    f_len = next((r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"), None)
    inside = [n for n in lengths if f_len is not None and n <= f_len]
    past = [n for n in lengths if f_len is not None and n > f_len]
    claims = []

    def check(number: int, cells: list[tuple[tuple[str, str], int]], at: int, stat, threshold: float, side: int):
        """Claim ``number`` at length ``at`` on ``cells`` (``((rule, stage), length)``)."""
        if any(rs not in every for rs, _ in cells):
            return
        of = set.intersection(*(set(every[rs]) for rs, _ in cells))
        seeds = sorted(set.intersection(*(set(good[rs]) for rs, _ in cells)))
        entry = {"claim": CLAIMS[number], "number": number, "length": at, "of": len(of), "seeds": len(seeds)}
        entry["effect"] = "recovery" if number == 4 else "ratio" if lm else "difference"
        claims.append(entry)
        if not seeds:
            entry.update(holds=0, ties=0, est=None, lo=None, hi=None, verdict="not judged")
            return
        entries = [[at_length(good[rs][k], n) for rs, n in cells] for k in seeds]
        with np.errstate(divide="ignore", invalid="ignore"):  # a recovery with no gap is nan: not held
            per_seed = stat(np.array([[m[key] for m in seed] for seed in entries], dtype=np.float64))  # [seeds]
        entry["holds"] = int(sum(_verdict(x, x, threshold, side) == "agrees" for x in per_seed))
        entry["ties"] = int(sum(x == threshold for x in per_seed)) if number != 4 else 0
        entry["per_seed"] = [float(x) for x in per_seed]
        entry.update(judge(key, [[_counts(key, m) for m in seed] for seed in entries], stat, threshold, side))

    def two(x: np.ndarray) -> np.ndarray:
        return x[:, 0] / x[:, 1] if lm else x[:, 0] - x[:, 1]

    def recovery(x: np.ndarray) -> np.ndarray:
        return (x[:, 0] - x[:, 2]) / (x[:, 0] - x[:, 1])

    better = -1 if lm else 1  # the side of the effect where a is better than b
    threshold = 1.0 if lm else 0.0
    zs = "zero-shot"
    for n in lengths:
        check(1, [(("none", zs), n), (("none", zs), L)], n, two, threshold, -better)
        check(2, [(("linear", zs), n), (("none", zs), n)], n, two, threshold, better)
        check(3, [(("ntk", zs), n), (("linear", zs), n)], n, two, threshold, better)
    for n in inside:
        check(4, [(("none", zs), n), (("none", zs), L), (("linear", "fine-tuned"), n)], n, recovery, 0.5, 1)
    for n in lengths:
        check(5, [(("yarn", "fine-tuned"), n), (("linear", "fine-tuned"), n)], n, two, threshold, better)
    if lm:
        for n in past:
            check(6, [(("yarn", "fine-tuned-covering"), n), (("yarn", "fine-tuned"), f_len)], n, two, threshold, better)
    else:
        for n in inside:
            check(7, [(("linear", "fine-tuned"), n), (("none", "fine-tuned"), n)], n, two, threshold, better)
    return sorted(claims, key=lambda c: (c["number"], c["length"]))


def ratio_interval(
    data: dict[str, Any], task: str, key: str, rule: str, stage: str, n: int
) -> tuple[float, float, float]:
    """Press et al.'s ratio ``ppl(n) / ppl(L)`` of one rule and stage, pooled over seeds,
    with its paired interval (``intervals.ppl_ratio_interval``)."""
    if not key.startswith("ppl"):
        raise ValueError(f"a length ratio is of a perplexity (ppl, ppl_sliding), got {key!r}")
    good = runs_by_stage(data, task)
    if not good.get((rule, stage)):
        raise ValueError(f"no records of {rule!r} {stage!r} on {task!r}")
    L = task_records(data, task)[0]["train_length"]
    return ppl_ratio_interval(
        [(_counts(key, at_length(r, n)), _counts(key, at_length(r, L))) for r in good[(rule, stage)].values()]
    )


def claim_cell(c: dict[str, Any] | None) -> str:
    """One cell of an ordering table: the verdict, ``holds/seeds`` (ties), the effect with
    its interval, and the seeds left out for not keeping the task."""
    if c is None:
        return "-"
    if c["verdict"] == "not judged":
        return f"not judged (0 of {c['of']} seeds kept the task in every run compared)"
    d = 2 if c["effect"] == "recovery" else 3
    ties = f", {c['ties']} tied" if c["ties"] else ""
    left = (
        f"; {c['of'] - c['seeds']} of {c['of']} seeds left out (did not keep the task)" if c["seeds"] < c["of"] else ""
    )
    effect = f"{c['effect']} {c['est']:.{d}f} [{c['lo']:.{d}f}, {c['hi']:.{d}f}]"
    return f"{c['verdict']}: {c['holds']}/{c['seeds']}{ties}, {effect}{left}"


def ordering_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric, the claims of ``orderings`` by length."""
    out = []
    for task in task_names(data):
        for key in metric_keys(data, task):
            claims = orderings(data, task, key)
            if not claims:
                continue
            lengths = sorted({c["length"] for c in claims})
            by_claim: dict[str, dict[int, dict]] = defaultdict(dict)
            for c in claims:
                by_claim[c["claim"]][c["length"]] = c
            rows = [[name, *(claim_cell(per.get(n)) for n in lengths)] for name, per in by_claim.items()]
            effect = "ratio a / b" if key.startswith("ppl") else "difference a − b"
            title = (
                f"{task}: published orderings by {key}: verdict, seeds where the claim holds strictly, "
                f"{effect} with its {LEVEL:.0%} interval (claim 4: the recovery)"
            )
            out.append(TableData(title, ["claim", *map(str, lengths)], rows))
    return out
