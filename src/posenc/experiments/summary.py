"""Results -> tables: mean and seed spread per (task, encoding, length).

Every table is a ``TableData``: strings ready for the terminal (``to_rich``), markdown
(``to_markdown``: docs and ``<run_dir>/results.md``) and the HTML report; the tables of a
metric by length (``metric_tables``) also keep the numbers behind their cells for plots.

Two rules hold for every table, rank and comparison built from records here and in
``posenc.experiments.published``:

* A learning-rate sweep (``posenc.experiments.study``, ``Preset.lr_sweep``) leaves one
  learning rate per (task, encoding): ``selected`` keeps the runs at the rate that
  ``choose_lr`` picks on the in-distribution validation score; the sweep's other runs
  appear only in ``sweep_table``. Records without a sweep pass through unchanged.
* Ranks use only synthetic runs that learned their task in distribution (exact match
  over lengths ``1..L`` at least ``LEARNED_BAR``); the others are shown as "did not
  learn" with that exact match, never ranked. Language-modelling runs have no such bar:
  their comparisons are not gated.
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
#: The presets' learning rate (``posenc.experiments.study``): a sweep's ties go to it.
PRESET_LR = 3e-3


def learned(record: dict[str, Any], bar: float = LEARNED_BAR) -> bool:
    """True for a synthetic run whose exact match over lengths ``1..L`` is at least
    ``bar``, and for every language-modelling run (no bar: not gated)."""
    return "exact_match" not in record["metrics"][0] or in_distribution(record) >= bar


def not_learned(records: list[dict[str, Any]], bar: float = LEARNED_BAR) -> list[dict[str, Any]]:
    """The synthetic runs of ``selected(records)`` whose exact match over lengths ``1..L``
    is below ``bar``: their scores past ``L`` say nothing about generalization. A sweep's
    unchosen runs are not listed; language-modelling runs have no such bar and are never
    listed."""
    return [r for r in selected(records) if not learned(r, bar)]


# -- the learning-rate sweep ---------------------------------------------------------------


def run_lr(record: dict[str, Any]) -> float | None:
    """The learning rate a record was trained with (``config.train.lr``), or ``None``."""
    lr = record.get("config", {}).get("train", {}).get("lr")
    return None if lr is None else float(lr)


def _by_pair(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[(r["task"], r["encoding"])].append(r)
    return out


def sweep_seed(records: list[dict[str, Any]]) -> int:
    """The seed of one (task, encoding)'s records that spans the most learning rates (the
    smallest such seed): the seed a sweep ran on."""
    lrs: dict[int, set] = defaultdict(set)
    for r in records:
        lrs[r["seed"]].add(run_lr(r))
    return min(lrs, key=lambda seed: (-len(lrs[seed]), seed))


def _validation(record: dict[str, Any]) -> tuple[float, bool]:
    """``(value, higher_is_better)`` of ``record["validation"]``; ``ValueError`` without it."""
    v = record.get("validation")
    if not isinstance(v, dict) or not isinstance(v.get("value"), (int, float)) or "higher_is_better" not in v:
        raise ValueError(
            f"run {record['run_id']!r} has no validation score (record['validation']['value']), so no learning "
            "rate can be chosen for it: records written before validation existed cannot be swept; train the "
            "sweep again with the current posenc, in a run folder of its own (--out) if this one holds an older "
            "study's records"
        )
    return float(v["value"]), bool(v["higher_is_better"])


def _validation_by_lr(records: list[dict[str, Any]]) -> tuple[dict[float, float], bool]:
    """One (task, encoding)'s validation value per learning rate on its sweep seed (the
    mean if a rate has several records) and whether higher is better."""
    seed = sweep_seed(records)
    values: dict[float, list[float]] = defaultdict(list)
    directions = set()
    for r in records:
        if r["seed"] != seed:
            continue
        lr = run_lr(r)
        if lr is None:
            raise ValueError(f"run {r['run_id']!r} has no config.train.lr: a learning rate cannot be chosen for it")
        value, higher = _validation(r)
        values[lr].append(value)
        directions.add(higher)
    if len(directions) != 1:
        raise ValueError(f"runs of {records[0]['task']} / {records[0]['encoding']} disagree on higher_is_better")
    return {lr: statistics.fmean(v) for lr, v in values.items()}, directions.pop()


def choose_lr(records: list[dict[str, Any]], preferred: float = PRESET_LR) -> dict[tuple[str, str], float]:
    """The learning rate of every (task, encoding) of ``records``: on its sweep seed
    (``sweep_seed``; seed 0 in the presets), the rate whose run has the best
    ``record["validation"]["value"]`` (in-distribution validation, never the test
    lengths: higher is better for exact match, lower for perplexity; a non-finite value
    is the worst). Ties go to ``preferred`` (the presets' rate), then to the smaller
    rate. A (task, encoding) with records at one rate only gets that rate; one with
    several and no validation score is a ``ValueError``."""
    out = {}
    for pair, recs in _by_pair(records).items():
        lrs = {run_lr(r) for r in recs}
        if len(lrs) == 1:
            (lr,) = lrs
            if lr is None:
                raise ValueError(f"run {recs[0]['run_id']!r} has no config.train.lr")
            out[pair] = lr
            continue
        scores, higher = _validation_by_lr(recs)

        def key(lr: float, scores: dict[float, float] = scores, higher: bool = higher) -> tuple:
            v = scores[lr]
            worst = not math.isfinite(v)
            return (worst, 0.0 if worst else (-v if higher else v), lr != preferred, lr)

        out[pair] = min(scores, key=key)
    return out


def judged(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as the tables judge it: a run trained with randomized positions
    (Ruoss et al. 2023) is scored at their randomized test positions, the protocol it
    was trained and validated under (their ``range_evaluation`` draws sorted random
    positions at test time too): a copy whose ``metrics`` are its ``metrics_random``
    and whose ``metrics_arange`` are its scores at positions ``0..s-1``. Every other
    record (and an older randomized one without ``metrics_random``) is returned as is."""
    if "metrics_random" not in record:
        return record
    return {**record, "metrics": record["metrics_random"], "metrics_arange": record["metrics"]}


def selected(records: list[dict[str, Any]], preferred: float = PRESET_LR) -> list[dict[str, Any]]:
    """The records the tables show, each ``judged``, without a sweep's unchosen runs: for
    every (task, encoding) trained at more than one learning rate only its runs at
    ``choose_lr``'s rate (the sweep seed's chosen run and the other seeds'), in the
    original order. Records of a (task, encoding) at one rate (no sweep: the quick
    preset, older records) all pass."""
    pairs = _by_pair(records)
    swept = {pair for pair, recs in pairs.items() if len({run_lr(r) for r in recs}) > 1}
    chosen = choose_lr([r for pair in swept for r in pairs[pair]], preferred) if swept else {}
    return [
        judged(r) for r in records if (pair := (r["task"], r["encoding"])) not in swept or run_lr(r) == chosen[pair]
    ]


def sweep_table(records: list[dict[str, Any]], preferred: float = PRESET_LR) -> TableData | None:
    """The learning-rate sweep: per swept (task, encoding) its sweep seed, the validation
    metric and size, the validation value at every rate ("-": not run), the chosen rate
    and where it lies among the rates tried ("lowest tried", "highest tried": the best
    rate may lie outside the grid; "inside"). ``None`` when no (task, encoding) was
    trained at more than one rate."""
    pairs = {p: recs for p, recs in _by_pair(records).items() if len({run_lr(r) for r in recs}) > 1}
    if not pairs:
        return None
    chosen = choose_lr([r for recs in pairs.values() for r in recs], preferred)
    grid = sorted({lr for recs in pairs.values() for r in recs if (lr := run_lr(r)) is not None})
    rows = []
    for task, by_enc in group([r for recs in pairs.values() for r in recs]).items():
        for enc, recs in by_enc.items():
            scores, higher = _validation_by_lr(recs)
            seed = sweep_seed(recs)
            v = next(r["validation"] for r in recs if r["seed"] == seed)
            what = f"{v.get('metric', '?')} ({'higher' if higher else 'lower'} is better), size {v.get('size', '?')}"
            cells = ["-" if lr not in scores else f"{scores[lr]:.4f}" for lr in grid]
            lr = chosen[(task, enc)]
            tried = sorted(scores)
            where = "lowest tried" if lr == tried[0] else "highest tried" if lr == tried[-1] else "inside"
            rows.append([task, enc, str(seed), what, *cells, f"{lr:g}", where])
    cols = ["task", "encoding", "seed", "validation", *(f"lr {lr:g}" for lr in grid), "chosen lr", "chosen at"]
    title = (
        "learning-rate sweep: in-distribution validation score at each learning rate "
        f"(ties go to {preferred:g}, then the smaller rate); the tables use only the chosen rate's runs"
    )
    return TableData(title, cols, rows)


def not_learned_note(unlearned: list[dict[str, Any]]) -> str:
    """One sentence naming the runs that did not learn in distribution."""
    runs = ", ".join(f"{r['encoding']} on {r['task']} (seed {r['seed']})" for r in unlearned)
    return (
        f"{len(unlearned)} run(s) did not learn in distribution (exact match over lengths 1..L below "
        f"{LEARNED_BAR}): {runs}. Their scores past L say nothing about generalization; ranks and comparisons "
        "past L leave them out."
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
    length) and token accuracy; per corpus perplexity, sliding perplexity and ratios; then
    the gated mean ranks (``mean_ranks``). Only ``selected(records)`` are shown."""
    records = selected(records)
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


def mean_ranks(
    records: list[dict[str, Any]], factor: int = 2, key: str = "token_accuracy", bar: float = LEARNED_BAR
) -> TableData | None:
    """Kazemnejad et al. 2023's summary, gated: rank the encodings on every synthetic task
    by ``key`` averaged over the lengths ``L < n <= factor * L`` and over the encoding's
    runs that learned the task in distribution (``learned``: exact match over ``1..L`` at
    least ``bar``), then average each encoding's ranks over the tasks it was ranked on
    (1 = best; ties share the mean rank; column "tasks ranked"). An encoding none of whose
    runs of a task learned it is not ranked there: its cell says "did not learn" with the
    mean in-distribution exact match of its runs; one that learned no task has no mean
    rank. A cell over some of an encoding's runs says how many. Only
    ``selected(records)`` count. ``None`` if there are no synthetic tasks.

    Seed spread: the same ranking done separately for every seed that all encodings of a
    task have (each seed's learned runs ranked, averaged over tasks), shown as mean ± std
    of those per-seed mean ranks."""
    per_task: dict[str, dict[str, str]] = {}  # task -> encoding -> cell text
    ranks: dict[str, list[float]] = defaultdict(list)
    per_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for task, by_enc in group(selected(records)).items():
        first = next(iter(by_enc.values()))
        if is_lm(first):
            continue
        cells, scores = {}, {}
        for enc, recs in by_enc.items():
            if enc not in order:
                order.append(enc)
            ok = [r for r in recs if learned(r, bar)]
            if not ok:
                cells[enc] = f"did not learn ({statistics.fmean(in_distribution(r) for r in recs):.2f})"
            elif (v := _window_mean(ok, key, factor)) is not None:
                scores[enc] = v
                cells[enc] = f"{v:.3f}" + ("" if len(ok) == len(recs) else f" ({len(ok)} of {len(recs)} learned)")
        per_task[task] = cells
        for enc, rank in _ranks(scores).items():
            ranks[enc].append(rank)
        common = set.intersection(*({r["seed"] for r in recs} for recs in by_enc.values()))
        for seed in sorted(common):
            seeded = {
                enc: _window_mean([r for r in recs if r["seed"] == seed and learned(r, bar)], key, factor)
                for enc, recs in by_enc.items()
            }
            for enc, rank in _ranks({e: v for e, v in seeded.items() if v is not None}).items():
                per_seed[seed][enc].append(rank)
    if not per_task:
        return None
    seeds = [s for s, by_enc in per_seed.items() if by_enc]

    def spread(enc: str) -> str:
        vals = [statistics.fmean(per_seed[s][enc]) for s in seeds if per_seed[s].get(enc)]
        return Cell.of(vals).fmt(2) if vals else "-"

    ranked = sorted((e for e in order if ranks[e]), key=lambda e: statistics.fmean(ranks[e]))
    rows = [
        [
            enc,
            f"{statistics.fmean(ranks[enc]):.2f}" if ranks[enc] else "did not learn",
            spread(enc),
            str(len(ranks[enc])),
            *(per_task[t].get(enc, "-") for t in per_task),
        ]
        for enc in ranked + [e for e in order if not ranks[e]]
    ]
    cols = [
        "encoding",
        "mean rank",
        f"per-seed rank ({len(seeds)} seed{'s' * (len(seeds) != 1)})",
        "tasks ranked",
        *(f"{t} {key} (L, {factor}L]" for t in per_task),
    ]
    title = (
        f"mean rank by {key} on lengths (L, {factor}L], over synthetic tasks (1 = best), only runs that learned "
        f"in distribution (exact match over lengths 1..L >= {bar})"
    )
    return TableData(title, cols, rows)


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
    metric's mean ± std over seeds at every evaluation length ("–": not evaluated). Only
    ``selected(records)`` are shown."""
    records = selected(records)
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
