"""Results -> tables: mean and seed spread per (task, encoding, length).

Every table is a ``TableData``: strings ready for the terminal (``to_rich``), markdown
(``to_markdown``: docs and ``<run_dir>/results.md``) and the HTML report; the tables of a
metric by length (``metric_tables``) also keep the numbers behind their cells for plots.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from typing import Any, NamedTuple

from rich.table import Table

from posenc.experiments.config import QUICK_ENCODINGS, TASKS

LM_KEYS = ("ppl", "ppl_sliding")
SYN_KEYS = ("exact_match", "token_accuracy")


class Cell(NamedTuple):
    """A metric over seeds: mean, sample standard deviation (0 for one seed), count."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Cell:
        """The cell of ``values`` (one per seed)."""
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def fmt(self, digits: int = 2) -> str:
        if self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}"


def is_lm(records: list[dict[str, Any]]) -> bool:
    return "ppl" in records[0]["metrics"][0]


def in_distribution(record: dict[str, Any], key: str = "exact_match") -> float:
    """Mean of ``key`` over the lengths ``1..train_length`` (synthetic tasks)."""
    vals = [m[key] for m in record["metrics"] if m["length"] <= record["train_length"]]
    return statistics.fmean(vals)


#: In-distribution exact match below which a synthetic run did not learn its task.
LEARNED_BAR = 0.9


def not_learned(records: list[dict[str, Any]], bar: float = LEARNED_BAR) -> list[dict[str, Any]]:
    """The synthetic runs whose exact match over lengths ``1..L`` is below ``bar``: their
    scores past ``L`` say nothing about generalization. Language-modelling runs have no
    such bar and are never listed."""
    return [r for r in records if "exact_match" in r["metrics"][0] and in_distribution(r) < bar]


def not_learned_note(unlearned: list[dict[str, Any]]) -> str:
    """One sentence naming the runs that did not learn in distribution."""
    runs = ", ".join(f"{r['encoding']} on {r['task']} (seed {r['seed']})" for r in unlearned)
    return (
        f"{len(unlearned)} run(s) did not learn in distribution (exact match over lengths 1..L below "
        f"{LEARNED_BAR}): {runs}. Their scores past L, and ranks that include them, say nothing about "
        "generalization."
    )


def ratio(record: dict[str, Any], length: int, key: str = "ppl") -> float:
    """``ppl(length) / ppl(train_length)`` (Press et al. 2022, Table 2's quantity)."""
    by_len = {m["length"]: m[key] for m in record["metrics"]}
    return by_len[length] / by_len[record["train_length"]]


def group(records: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{task: {encoding: [records over seeds]}}`` in a fixed order, whatever the order of
    the records (a shared run folder's file is reordered by each study command): tasks as
    in ``TASKS``, encodings as in the quick preset (the classic story first), then the
    others alphabetically, each ``NAME+randpos`` right after ``NAME``."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["task"]][r["encoding"]].append(r)
    tasks = sorted(out, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))
    return {t: {e: out[t][e] for e in sorted(out[t], key=_encoding_order)} for t in tasks}


def _encoding_order(name: str) -> tuple[int, str, str]:
    base, _, variant = name.partition("+")
    rank = QUICK_ENCODINGS.index(base) if base in QUICK_ENCODINGS else len(QUICK_ENCODINGS)
    return rank, base, variant


@dataclasses.dataclass
class TableData:
    """One table: a title, column names and rows of strings (first column: encoding).

    A table of one metric by evaluation length (``metric_tables``) also names its
    ``task`` and ``metric`` and keeps, per row, the numbers behind the cells of
    ``lengths`` (``cells``; ``None`` where a row was not evaluated at that length)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    task: str | None = None
    metric: str | None = None
    lengths: list[int] = dataclasses.field(default_factory=list)
    cells: list[list[Cell | None]] = dataclasses.field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        return not (self.metric or "").startswith("ppl")


def tables(records: list[dict[str, Any]]) -> list[TableData]:
    """The study's tables: per synthetic task exact match (in-distribution mean and per
    length) and token accuracy; per corpus perplexity, sliding perplexity and ratios."""
    out: list[TableData] = []
    for task, by_enc in group(records).items():
        first = next(iter(by_enc.values()))
        L = first[0]["train_length"]
        lengths = [m["length"] for m in first[0]["metrics"] if m["length"] >= L]
        spread = _seed_note(sorted({len(v) for v in by_enc.values()}))
        if is_lm(first):
            for key, name in (("ppl", "perplexity, non-overlapping"), ("ppl_sliding", "perplexity, sliding window")):
                rows = []
                for enc, recs in by_enc.items():
                    cells = [Cell.of([{m["length"]: m[key] for m in r["metrics"]}[n] for r in recs]) for n in lengths]
                    rows.append([enc, *(c.fmt(2) for c in cells)])
                out.append(TableData(f"{task}: {name}, L={L}{spread}", ["encoding", *map(str, lengths)], rows))
            rows = []
            for enc, recs in by_enc.items():
                cells = [Cell.of([ratio(r, n) for r in recs]) for n in lengths[1:]]
                rows.append([enc, *(c.fmt(2) for c in cells)])
            cols = ["encoding", *(f"{n // L}L" for n in lengths[1:])]
            out.append(TableData(f"{task}: ppl(E) / ppl(L), non-overlapping, L={L}{spread}", cols, rows))
            continue
        for key, name in (("exact_match", "exact match"), ("token_accuracy", "token accuracy")):
            rows = []
            for enc, recs in by_enc.items():
                ind = Cell.of([in_distribution(r, key) for r in recs])
                cells = [Cell.of([{m["length"]: m[key] for m in r["metrics"]}[n] for r in recs]) for n in lengths]
                rows.append([enc, ind.fmt(2), *(c.fmt(2) for c in cells)])
            cols = ["encoding", f"1..{L}", *map(str, lengths)]
            out.append(TableData(f"{task}: {name} by length, trained on 1..{L}{spread}", cols, rows))
    ranked = mean_ranks(records)
    if ranked is not None:
        out.append(ranked)
    return out


def _seed_note(counts: list[int]) -> str:
    """Title suffix for rows over ``counts`` seeds (the distinct numbers of seeds per row)."""
    if counts == [1]:
        return " (1 seed)"
    if len(counts) == 1:
        return f" (mean ± std over {counts[0]} seeds)"
    note = f" (mean ± std over {counts[0]}–{counts[-1]} seeds"
    return note + ("; a value without ± is 1 seed)" if counts[0] == 1 else ")")


def _ranks(scores: dict[str, float]) -> dict[str, float]:
    """1 = highest score; ties share the mean of their ranks."""
    ordered = sorted(scores.values(), reverse=True)
    return {enc: ordered.index(v) + 1 + (ordered.count(v) - 1) / 2 for enc, v in scores.items()}


def _window_mean(recs: list[dict[str, Any]], key: str, factor: int) -> float | None:
    vals = [m[key] for r in recs for m in r["metrics"] if r["train_length"] < m["length"] <= factor * r["train_length"]]
    return statistics.fmean(vals) if vals else None


def mean_ranks(records: list[dict[str, Any]], factor: int = 2, key: str = "token_accuracy") -> TableData | None:
    """Kazemnejad et al. 2023's summary: rank the encodings on every synthetic task by
    ``key`` (mean over seeds) averaged over the lengths ``L < n <= factor * L``, then
    average the ranks over tasks (1 = best; ties share the mean rank). ``None`` if there
    are no synthetic tasks.

    Seed spread: the same ranking done separately for every seed that all encodings of a
    task have (each seed's scores ranked, averaged over tasks), shown as mean ± std of
    those per-seed mean ranks."""
    per_task: dict[str, dict[str, float]] = {}
    per_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task, by_enc in group(records).items():
        first = next(iter(by_enc.values()))
        if is_lm(first):
            continue
        scores = {enc: v for enc, recs in by_enc.items() if (v := _window_mean(recs, key, factor)) is not None}
        per_task[task] = scores
        common = set.intersection(*({r["seed"] for r in recs} for recs in by_enc.values()))
        for seed in sorted(common):
            seeded = {
                enc: _window_mean([r for r in recs if r["seed"] == seed], key, factor) for enc, recs in by_enc.items()
            }
            for enc, rank in _ranks({e: v for e, v in seeded.items() if v is not None}).items():
                per_seed[seed][enc].append(rank)
    if not per_task:
        return None
    ranks: dict[str, list[float]] = defaultdict(list)
    for scores in per_task.values():
        for enc, rank in _ranks(scores).items():
            ranks[enc].append(rank)

    def spread(enc: str) -> str:
        vals = [statistics.fmean(by_enc[enc]) for by_enc in per_seed.values() if by_enc.get(enc)]
        return Cell.of(vals).fmt(2) if vals else "-"

    rows = [
        [
            enc,
            f"{statistics.fmean(r):.2f}",
            spread(enc),
            str(len(r)),
            *(f"{per_task[t].get(enc, float('nan')):.3f}" for t in per_task),
        ]
        for enc, r in sorted(ranks.items(), key=lambda kv: statistics.fmean(kv[1]))
    ]
    cols = [
        "encoding",
        "mean rank",
        f"per-seed rank ({len(per_seed)} seed{'s' * (len(per_seed) != 1)})",
        "tasks",
        *(f"{t} {key} (L, {factor}L]" for t in per_task),
    ]
    return TableData(f"mean rank by {key} on lengths (L, {factor}L], over synthetic tasks (1 = best)", cols, rows)


def to_markdown(tables_: list[TableData]) -> str:
    parts = []
    for t in tables_:
        parts.append(f"**{t.title}**\n")
        parts.append("| " + " | ".join(t.columns) + " |")
        parts.append("|" + "|".join(["---"] + ["---:"] * (len(t.columns) - 1)) + "|")
        parts.extend("| " + " | ".join(r) + " |" for r in t.rows)
        parts.append("")
    return "\n".join(parts)


def to_rich(t: TableData) -> Table:
    """A ``rich.table.Table`` of one ``TableData``."""
    table = Table(title=t.title)
    for i, c in enumerate(t.columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in t.rows:
        table.add_row(*r)
    return table


#: The metric each ``metric_tables`` table shows, in order: higher is better except ppl.
PRIMARY = ("exact_match", "ppl", "token_accuracy", "ppl_sliding")


def metric_tables(records: list[dict[str, Any]]) -> list[TableData]:
    """The HTML report's tables: one per task (alphabetically) and metric (``PRIMARY``
    order, then the rest alphabetically), a row per (encoding, training length) with the
    metric's mean ± std over seeds at every evaluation length ("–": not evaluated)."""
    out = []
    for task in sorted({r["task"] for r in records}):
        task_runs = [r for r in records if r["task"] == task]
        keys = {k for r in task_runs for m in r["metrics"] for k in m if k != "length"}
        for metric in [k for k in PRIMARY if k in keys] + sorted(keys - set(PRIMARY)):
            out.append(_metric_table(task, task_runs, metric))
    return out


def _metric_table(task: str, task_runs: list[dict[str, Any]], metric: str) -> TableData:
    lengths = sorted({m["length"] for r in task_runs for m in r["metrics"]})
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in task_runs:
        groups.setdefault((r["encoding"], r["train_length"]), []).append(r)
    rows, cells = [], []
    for (enc, tl), runs in sorted(groups.items()):
        row_cells: list[Cell | None] = []
        for n in lengths:
            vals = [
                float(m[metric])
                for r in runs
                for m in r["metrics"]
                if m["length"] == n and isinstance(m.get(metric), (int, float))
            ]
            vals = [v for v in vals if math.isfinite(v)]
            row_cells.append(Cell.of(vals) if vals else None)
        cells.append(row_cells)
        rows.append(
            [
                enc,
                str(tl),
                *("–" if c is None else f"{c.mean:.3g}" + (f" ± {c.std:.2g}" if c.n > 1 else "") for c in row_cells),
            ]
        )
    better = "lower" if metric.startswith("ppl") else "higher"
    return TableData(
        f"{task}: {metric} ({better} is better), mean ± std over seeds",
        ["encoding", "train length", *map(str, lengths)],
        rows,
        task=task,
        metric=metric,
        lengths=lengths,
        cells=cells,
    )
