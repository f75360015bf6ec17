"""The mechanism probes' records -> tables: how much of the drop past ``L`` each
intervention recovers, an attribution per encoding, and the attention statistics.

A record is any dict with ``task``, ``encoding``, ``seed``, ``train_length`` and
``probes`` (``posenc.experiments.diagnose.probe_metrics``). The score ``s`` is exact
match (or token accuracy) for synthetic tasks and the mean NLL per token, ``log ppl``,
for corpora (perplexity itself is dominated by its blow-ups). At each test length ``E``:

    recovery(c) = (s_c - s_E) / (s_L - s_E)

with ``s_L`` the in-distribution score (no intervention, length ``L``), ``s_E`` the score
at ``E`` without intervention, ``s_c`` under condition ``c``: 1 = back to the score at
``L``, 0 = no better than without the intervention. For ``shifted`` (length ``L``,
positions of the end of length ``E``), ``1 - recovery`` is the share of the drop that
unseen positions alone reproduce. A run whose score at ``E`` is not worse than at ``L``
by at least ``min_drop`` has no drop to explain and no recovery.

``counted_records`` picks the records a study's mechanism tables may use: probes, a
complete learning-rate sweep, the sweep's chosen rate, learned in distribution.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from posenc.experiments.summary import LEARNED_BAR, TableData, group, learned, run_lr, selected, sweep_seed

#: The interventions, in the tables' order, and their column names.
INTERVENTIONS = {
    "shifted": "shifted",
    "window": "window",
    "temperature": "temperature",
    "window_temperature": "window+temp",
}
#: Smallest drop from ``L`` to ``E`` that a recovery is computed for: exact match or
#: token accuracy (absolute), or nats per token for corpora.
MIN_DROP = {"synthetic": 0.1, "lm": 0.05}
#: An intervention explains a cause when it recovers (or reproduces) at least this share.
BAR = 0.5


def attribution_legend(bar: float = BAR) -> str:
    """What each attribution label of ``attribution(..., bar)`` means."""
    return (
        f"positions: unseen positions alone (shifted) reproduce >= {bar:g} of the drop; "
        f"dilution: the temperature alone recovers >= {bar:g}; "
        f"distances+dilution: the window recovers >= {bar:g} and the temperature does not; "
        "unexplained: none of these; no drop: the score at E is not worse than at L by the minimum drop"
    )


def score(metrics: dict[str, Any], kind: str, metric: str = "exact_match") -> float:
    """A condition's score: ``metric`` (synthetic) or the mean NLL per token (corpora)."""
    if kind == "lm":
        return metrics["nll"] / metrics["tokens"]
    return metrics[metric]


def recoveries(
    probes: dict[str, Any], *, metric: str = "exact_match", min_drop: float | None = None
) -> dict[int, dict[str, float] | None]:
    """``{E: {intervention: recovery}}`` of one run; ``None`` at a length without a drop
    (the score at ``E`` is not worse than at ``L`` by ``min_drop``, default ``MIN_DROP``)."""
    kind = probes["kind"]
    if min_drop is None:
        min_drop = MIN_DROP[kind]
    sign = -1.0 if kind == "lm" else 1.0  # lower NLL is better
    ref = score(probes["reference"], kind, metric)
    out: dict[int, dict[str, float] | None] = {}
    for entry in probes["lengths"]:
        at_e = score(entry["none"], kind, metric)
        drop = ref - at_e
        if sign * drop < min_drop:
            out[entry["length"]] = None
            continue
        out[entry["length"]] = {c: (score(entry[c], kind, metric) - at_e) / drop for c in INTERVENTIONS}
    return out


def attribution(recovery: dict[str, float] | None, bar: float = BAR) -> str:
    """The causes that ``recovery`` (one length, one run or a mean over seeds) supports
    (``attribution_legend``), joined by ``+``."""
    if recovery is None:
        return "no drop"
    causes = []
    if 1.0 - recovery["shifted"] >= bar:
        causes.append("positions")
    if recovery["temperature"] >= bar:
        causes.append("dilution")
    elif recovery["window"] >= bar:
        causes.append("distances+dilution")
    return " + ".join(causes) or "unexplained"


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} [{min(values):.2f}, {max(values):.2f}]"


def _display(metrics: dict[str, Any], kind: str, metric: str) -> float:
    return metrics["ppl"] if kind == "lm" else metrics[metric]


def mean_recovery(per_seed: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each intervention's recovery averaged over the seeds with a drop (the entries of
    ``recoveries`` at one length, one per seed); ``None`` when no seed has a drop."""
    ok = [r for r in per_seed if r is not None]
    if not ok:
        return None
    return {c: statistics.fmean(r[c] for r in ok) for c in INTERVENTIONS}


def recovery_tables(
    records: list[dict[str, Any]], *, metric: str = "exact_match", min_drop: float | None = None, bar: float = BAR
) -> list[TableData]:
    """One table per task and test length ``E``: per encoding, the seeds with a drop,
    the score at ``L`` and at ``E`` (mean over seeds; perplexity for corpora), each
    intervention's recovery (mean over the seeds with a drop, then ``[min, max]`` over
    them: no brackets in the title, which rich would read as markup)
    and the attribution of the mean. Records without ``probes`` are left out."""
    out = []
    for task, by_enc in group([r for r in records if r.get("probes")]).items():
        first = next(iter(by_enc.values()))[0]["probes"]
        kind, L = first["kind"], first["train_length"]
        name = "perplexity" if kind == "lm" else metric.replace("_", " ")
        for e in [entry["length"] for entry in first["lengths"]]:
            rows = []
            for enc, recs in by_enc.items():
                per_seed, ref, at_e = [], [], []
                for r in recs:
                    entry = {x["length"]: x for x in r["probes"]["lengths"]}.get(e)
                    if entry is None:
                        continue
                    per_seed.append(recoveries(r["probes"], metric=metric, min_drop=min_drop)[e])
                    ref.append(_display(r["probes"]["reference"], kind, metric))
                    at_e.append(_display(entry["none"], kind, metric))
                if not per_seed:
                    continue
                ok = [p for p in per_seed if p is not None]
                cells = [_fmt([p[c] for p in ok]) for c in INTERVENTIONS]
                rows.append(
                    [
                        enc,
                        f"{len(ok)}/{len(per_seed)}",
                        f"{statistics.fmean(ref):.2f}",
                        f"{statistics.fmean(at_e):.2f}",
                        *cells,
                        attribution(mean_recovery(per_seed), bar),
                    ]
                )
            title = (
                f"{task}: share of the drop from L={L} to E={e} ({e // L}L) recovered by each intervention, "
                f"(s_c - s_E) / (s_L - s_E) on {'log ' if kind == 'lm' else ''}{name}; "
                "mean, and the range over the seeds with a drop"
            )
            cols = ["encoding", "seeds with a drop", f"{name} at L", f"{name} at E", *INTERVENTIONS.values()]
            out.append(TableData(title, [*cols, "attribution"], rows, task=task, metric=metric))
    return out


def attribution_table(
    records: list[dict[str, Any]], *, metric: str = "exact_match", min_drop: float | None = None, bar: float = BAR
) -> TableData | None:
    """Per encoding and task, the attribution at every test length (``attribution_legend``,
    from the mean recovery over seeds). ``None`` without probes."""
    by_task = group([r for r in records if r.get("probes")])
    if not by_task:
        return None
    encodings: list[str] = []
    for by_enc in by_task.values():
        encodings += [e for e in by_enc if e not in encodings]
    rows = []
    for enc in encodings:
        row = [enc]
        for by_enc in by_task.values():
            recs = by_enc.get(enc, [])
            if not recs:
                row.append("-")
                continue
            L = recs[0]["probes"]["train_length"]
            parts = []
            for entry in recs[0]["probes"]["lengths"]:
                e = entry["length"]
                per_seed = [recoveries(r["probes"], metric=metric, min_drop=min_drop).get(e) for r in recs]
                parts.append(f"{e // L}L: {attribution(mean_recovery(per_seed), bar)}")
            row.append("; ".join(parts))
        rows.append(row)
    return TableData("attribution of the drop past L, per encoding and task", ["encoding", *by_task], rows)


#: The hypotheses of the mechanism study: attribution label, name, sources (the papers
#: that argue it) and the encodings each source names as failing for that reason.
HYPOTHESES = (
    ("positions", "unseen positions", "Ruoss et al. 2023", "absolute encodings (positions past L never seen)"),
    (
        "distances+dilution",
        "unseen distances (the window also removes dilution)",
        "Press et al. 2022; Raffel et al. 2020",
        "sinusoidal and rotary encodings (Press); T5 past its largest bucket (Raffel)",
    ),
    (
        "dilution",
        "attention dilution",
        "Chiang & Cholak 2022; Wang et al. 2024; Peng et al. 2023",
        "NoPE (Wang); every encoding at long lengths (Chiang & Cholak, the YaRN temperature)",
    ),
)


def hypothesis_table(
    records: list[dict[str, Any]], *, metric: str = "exact_match", min_drop: float | None = None, bar: float = BAR
) -> TableData | None:
    """Each hypothesis against the records: over every (task, encoding, E) with a drop
    (mean recovery over the seeds with one), how many the hypothesis's label explains
    (``attribution`` at ``bar``; a cell can carry two labels) and which encodings those
    are, with their tasks and lengths. ``None`` without probes."""
    by_task = group([r for r in records if r.get("probes")])
    if not by_task:
        return None
    labels: list[tuple[str, str, str]] = []  # (encoding, task E, attribution) of each cell with a drop
    for task, by_enc in by_task.items():
        for enc, recs in by_enc.items():
            L = recs[0]["probes"]["train_length"]
            for entry in recs[0]["probes"]["lengths"]:
                e = entry["length"]
                rec = mean_recovery([recoveries(r["probes"], metric=metric, min_drop=min_drop).get(e) for r in recs])
                if rec is not None:
                    labels.append((enc, f"{task} {e // L}L", attribution(rec, bar)))
    rows = []
    for label, name, sources, names in (*HYPOTHESES, ("unexplained", "none of the three", "-", "-")):
        hits = [(enc, where) for enc, where, got in labels if label in got.split(" + ")]
        per_enc: dict[str, list[str]] = {}
        for enc, where in hits:
            per_enc.setdefault(enc, []).append(where)
        found = "; ".join(f"{enc} ({', '.join(w)})" for enc, w in per_enc.items()) or "none"
        rows.append([name, sources, names, f"{len(hits)} of {len(labels)}", found])
    return TableData(
        f"each hypothesis against the counted records: cells (task, encoding, E) with a drop that its label "
        f"explains (attribution at {bar:g})",
        ["hypothesis", "sources", "what the sources predict", "cells explained", "where (encoding: task E)"],
        rows,
    )


def attention_means(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """``{length: {"entropy", "uniform_entropy", "near_mass"}}`` of the records of one task
    and encoding: the entropy (nats) and near-key mass averaged over layers, heads and
    records (each record keeps them per layer and head, ``[layer][head]``), and the
    entropy of uniform attention averaged over records, at every length of
    ``probes["attention"]`` (``L`` and each ``E``) that some record measured."""
    sums: dict[int, dict[str, list[float]]] = {}
    for r in records:
        for a in r["probes"]["attention"]:
            cell = sums.setdefault(a["length"], {"entropy": [], "uniform_entropy": [], "near_mass": []})
            cell["uniform_entropy"].append(a["uniform_entropy"])
            for key in ("entropy", "near_mass"):
                cell[key].append(statistics.fmean(x for row in a[key] for x in row))  # [layer][head] -> mean
    return {n: {k: statistics.fmean(v) for k, v in cell.items()} for n, cell in sorted(sums.items())}


def attention_table(records: list[dict[str, Any]]) -> list[TableData]:
    """Per task: per encoding the attention entropy (nats) and the mass on the nearest
    ``W`` keys at ``L`` and at each ``E``, averaged over layers, heads and seeds
    (``attention_means``), and the entropy of uniform attention."""
    out = []
    for task, by_enc in group([r for r in records if r.get("probes")]).items():
        first = next(iter(by_enc.values()))[0]["probes"]
        L = first["train_length"]
        lengths = [a["length"] for a in first["attention"]]
        rows = []
        for enc, recs in by_enc.items():
            means = attention_means(recs)
            cells = [
                f"{means[n][key]:.2f}" if n in means else "-"
                for key in ("entropy", "uniform_entropy", "near_mass")
                for n in lengths
            ]
            rows.append([enc, *cells])
        names = [f"{n // L}L" for n in lengths]
        cols = [
            "encoding",
            *(f"entropy {x}" for x in names),
            *(f"uniform {x}" for x in names),
            *(f"near mass {x}" for x in names),
        ]
        title = (
            f"{task}: attention entropy (nats) and mass on the nearest W={first['window']} keys of the scored "
            "queries, mean over layers, heads and seeds; uniform: the entropy of uniform attention"
        )
        out.append(TableData(title, cols, rows, task=task))
    return out


# -- which records count --------------------------------------------------------------------------


def counted_records(
    records: list[dict[str, Any]], *, grid: Iterable[float] | None = None, bar: float = LEARNED_BAR
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The records whose probes the mechanism tables use, and the others by reason.

    A record counts when it has ``probes``, its (task, encoding)'s learning-rate sweep is
    complete, it is one of the runs ``summary.selected`` keeps (the sweep's chosen rate),
    and it learned its task in distribution (``summary.learned`` at ``bar``; corpora are
    not gated). A sweep is complete when the pair's sweep seed (``summary.sweep_seed``)
    has a record at every rate of ``grid`` (default: every rate of ``records``, so a
    study without a sweep has one rate and every pair is complete): until then the
    chosen rate, hence which runs count, is not known.

    Returns:
        ``(counted, left_out)`` in the records' order; ``left_out`` maps ``"no probes"``,
        ``"sweep incomplete"``, ``"not chosen"`` (a sweep's other rates) and ``"did not
        learn"`` to their records.
    """
    left_out: dict[str, list[dict[str, Any]]] = {
        "no probes": [],
        "sweep incomplete": [],
        "not chosen": [],
        "did not learn": [],
    }
    probed = []
    for r in records:
        (probed if r.get("probes") else left_out["no probes"]).append(r)
    rates = {run_lr(r) for r in probed} if grid is None else {float(lr) for lr in grid}
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in probed:
        pairs.setdefault((r["task"], r["encoding"]), []).append(r)
    complete = set()
    for pair, recs in pairs.items():
        seed = sweep_seed(recs)
        if rates <= {run_lr(r) for r in recs if r["seed"] == seed}:
            complete.add(pair)
    ready = []
    for r in probed:
        (ready if (r["task"], r["encoding"]) in complete else left_out["sweep incomplete"]).append(r)
    chosen = {r["run_id"] for r in selected(ready)}
    counted = []
    for r in ready:  # learned on the record's own metrics (positions 0..s-1), where the probes are scored
        if r["run_id"] not in chosen:
            left_out["not chosen"].append(r)
        elif not learned(r, bar):
            left_out["did not learn"].append(r)
        else:
            counted.append(r)
    return counted, left_out
