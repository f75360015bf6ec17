"""Results -> tables: mean and seed spread per (task, encoding, length).

Pure numbers first (``aggregate``), then two renderings of the same rows: rich tables for
the terminal and markdown tables for docs and ``<run_dir>/results.md``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import Any

from posenc.experiments.config import QUICK_ENCODINGS, TASKS

LM_KEYS = ("ppl", "ppl_sliding")
SYN_KEYS = ("exact_match", "token_accuracy")


@dataclasses.dataclass(frozen=True)
class Cell:
    """A metric over seeds: mean, sample standard deviation (0 for one seed), count."""

    mean: float
    std: float
    n: int

    def fmt(self, digits: int = 2) -> str:
        if self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}"


def _cell(values: list[float]) -> Cell:
    return Cell(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def is_lm(records: list[dict[str, Any]]) -> bool:
    return "ppl" in records[0]["metrics"][0]


def in_distribution(record: dict[str, Any], key: str = "exact_match") -> float:
    """Mean of ``key`` over the lengths ``1..train_length`` (synthetic tasks)."""
    vals = [m[key] for m in record["metrics"] if m["length"] <= record["train_length"]]
    return statistics.fmean(vals)


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
    """One table: a title, column names and rows of strings (first column: encoding)."""

    title: str
    columns: list[str]
    rows: list[list[str]]


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
                    cells = [_cell([{m["length"]: m[key] for m in r["metrics"]}[n] for r in recs]) for n in lengths]
                    rows.append([enc, *(c.fmt(2) for c in cells)])
                out.append(TableData(f"{task}: {name}, L={L}{spread}", ["encoding", *map(str, lengths)], rows))
            rows = []
            for enc, recs in by_enc.items():
                cells = [_cell([ratio(r, n) for r in recs]) for n in lengths[1:]]
                rows.append([enc, *(c.fmt(2) for c in cells)])
            cols = ["encoding", *(f"{n // L}L" for n in lengths[1:])]
            out.append(TableData(f"{task}: ppl(E) / ppl(L), non-overlapping, L={L}{spread}", cols, rows))
            continue
        for key, name in (("exact_match", "exact match"), ("token_accuracy", "token accuracy")):
            rows = []
            for enc, recs in by_enc.items():
                ind = _cell([in_distribution(r, key) for r in recs])
                cells = [_cell([{m["length"]: m[key] for m in r["metrics"]}[n] for r in recs]) for n in lengths]
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
        return _cell(vals).fmt(2) if vals else "-"

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
    cols = ["encoding", "mean rank", f"per-seed rank ({len(per_seed)} seed{'s' * (len(per_seed) != 1)})", "tasks",
            *(f"{t} {key} (L, {factor}L]" for t in per_task)]  # fmt: skip
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


def to_rich(t: TableData):
    """A ``rich.table.Table`` of one ``TableData``."""
    from rich.table import Table

    table = Table(title=t.title)
    for i, c in enumerate(t.columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in t.rows:
        table.add_row(*r)
    return table
