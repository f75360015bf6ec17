"""docs/mechanisms.md from the first ``N`` records of ``docs/data/study_results.jsonl``
(the full preset's re-run appends records to that file for days), and the HTML
report's mechanism section.

The page holds two kinds of generated text, both rewritten by ``render_page`` and
checked by ``tests/test_mechanisms_doc.py`` (any difference fails):

* blocks, between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` lines
  (``BLOCKS``: provenance, which records count, the protocol, the recovery tables, the
  attribution, the attention statistics, the figures);
* quotes in prose, ``<!--q KIND ARGS-->value<!--/q-->`` (``quote``), among them
  ``<!--q records-->N<!--/q-->``: the number of lines the page was built from.

Records are only appended, so the page names ``N`` and the test recomputes it from the
first ``N`` lines: records appended after it never break it. Which records count is
``posenc.experiments.diagnose_summary.counted_records`` with the sweep's grid
``posenc.experiments.study.LR_GRID`` (the full preset's rates).

Regenerate the page (and its figures, ``docs/img/mechanisms_<task>.png``) from the
committed records::

    python -c "from posenc.pipeline.mechanisms_page import write_mechanisms_page; \\
write_mechanisms_page(count=$(git show HEAD:docs/data/study_results.jsonl | wc -l))"
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posenc.experiments.config import RANDPOS
from posenc.experiments.diagnose_summary import (
    BAR,
    HYPOTHESES,
    INTERVENTIONS,
    MIN_DROP,
    attention_means,
    attention_table,
    attribution_legend,
    attribution_table,
    counted_records,
    hypothesis_table,
    mean_recovery,
    recoveries,
    recovery_tables,
)
from posenc.experiments.results import validate_record
from posenc.experiments.study import LR_GRID
from posenc.experiments.summary import LEARNED_BAR, TableData, group, in_distribution, run_lr, to_markdown
from posenc.pipeline.extension_page import fill_page
from posenc.registry import get
from posenc.viz.mechanisms import MechanismFigure, figure_mechanisms, plot_mechanisms
from posenc.viz.study import safe_filename

ROOT = Path(__file__).resolve().parents[3]
RECORDS = ROOT / "docs" / "data" / "study_results.jsonl"
PAGE = ROOT / "docs" / "mechanisms.md"
RECORDS_LABEL = "docs/data/study_results.jsonl"
BLOCKS = ("provenance", "counting", "protocol", "recovery", "attribution", "claims", "attention", "figures")
#: What the recovery is computed on, per probes kind.
SCORES = {"synthetic": "exact match", "lm": "log perplexity"}


def read_first(path: str | Path, count: int | None) -> list[dict[str, Any]]:
    """The records of the first ``count`` lines of a results file (``validate_record``
    checks each; ``None``: every complete line); fewer lines than ``count`` is a
    ``ValueError`` naming the fix."""
    path = Path(path)
    if count is None:
        with path.open(encoding="utf-8") as fh:
            count = sum(1 for line in fh if line.endswith("\n"))
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0 (the number of lines to read), got {count!r}")
    records = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if i > count:
                break
            if not line.endswith("\n"):
                raise ValueError(f"{str(path)!r} line {i} is not complete yet: wait for it, or read fewer lines")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r} line {i} is corrupt: {err.msg}") from None
            records.append(validate_record(rec, f"{str(path)!r} line {i}"))
    if len(records) < count:
        raise ValueError(
            f"{str(path)!r} holds {len(records)} records, fewer than the {count} asked for: commit the records "
            "first, or build the page from fewer lines"
        )
    return records


# -- the figure's numbers ---------------------------------------------------------------------------


def figure_data(records: list[dict[str, Any]], task: str, metric: str = "exact_match") -> MechanismFigure:
    """What the figure of ``task`` draws, from records with ``probes`` (already the
    counted ones): per encoding the mean recovery at every ``E`` (``recoveries``,
    ``mean_recovery``) and the attention entropy (``attention_means``)."""
    by_enc = group([r for r in records if r.get("probes")]).get(task)
    if not by_enc:
        raise ValueError(f"no records with probes of task {task!r}")
    first = next(iter(by_enc.values()))[0]["probes"]
    lengths = sorted({x["length"] for recs in by_enc.values() for r in recs for x in r["probes"]["lengths"]})
    recovery: dict[str, dict[int, dict[str, float] | None]] = {}
    drops: dict[str, dict[int, str]] = {}
    entropy: dict[str, dict[int, float]] = {}
    uniform: dict[int, list[float]] = {}
    for enc, recs in by_enc.items():
        per_run = [recoveries(r["probes"], metric=metric) for r in recs]
        recovery[enc], drops[enc] = {}, {}
        for e in lengths:
            per_seed = [p[e] for p in per_run if e in p]
            if per_seed:
                recovery[enc][e] = mean_recovery(per_seed)
                drops[enc][e] = f"{sum(p is not None for p in per_seed)}/{len(per_seed)}"
        means = attention_means(recs)
        entropy[enc] = {n: m["entropy"] for n, m in means.items()}
        for n, m in means.items():
            uniform.setdefault(n, []).append(m["uniform_entropy"])
    return MechanismFigure(
        task=task,
        score=SCORES["lm"] if first["kind"] == "lm" else metric.replace("_", " "),
        train_length=first["train_length"],
        window=first["window"],
        encodings=list(by_enc),
        lengths=lengths,
        interventions=list(INTERVENTIONS),
        labels=list(INTERVENTIONS.values()),
        recovery=recovery,
        drops=drops,
        entropy=entropy,
        uniform={n: statistics.fmean(v) for n, v in sorted(uniform.items())},
    )


def _lr(record: dict[str, Any]) -> str:
    lr = run_lr(record)
    return "?" if lr is None else f"{lr:g}"


def _records(n: int) -> str:
    return f"{n} record{'s' * (n != 1)}"


def _tasks(records: list[dict[str, Any]]) -> list[str]:
    return list(group([r for r in records if r.get("probes")]))


# -- the generated blocks ---------------------------------------------------------------------------


def _distinct(values: Iterable[Any]) -> str:
    return "; ".join(dict.fromkeys(str(v) for v in values))


def protocol_table(records: list[dict[str, Any]]) -> TableData:
    """The probes' protocol as the records state it, per task: the model, ``L``, the
    window ``W``, each ``E`` with its temperature and offset, the examples or tokens
    scored, the score and its minimum drop (distinct values joined by ``;``)."""
    cells: dict[str, list[str]] = {}
    tasks = _tasks(records)
    for task in tasks:
        recs = [r for r in records if r["task"] == task and r.get("probes")]
        probes = [r["probes"] for r in recs]
        models = [r["config"]["model"] for r in recs]
        kind = probes[0]["kind"]
        rows = {
            "model": _distinct(f"{m['num_layers']} layers, dim {m['dim']}, {m['num_heads']} heads" for m in models),
            "trained length L": _distinct(p["train_length"] for p in probes),
            "window W = T(L), keys per query": _distinct(p["window"] for p in probes),
            "test lengths E": _distinct(", ".join(str(x["length"]) for x in p["lengths"]) for p in probes),
            "temperature log T(E) / log T(L)": _distinct(
                ", ".join(f"{x['length']}: {x['tau']:.4f}" for x in p["lengths"]) for p in probes
            ),
            "shifted: offset T(E) - T(L)": _distinct(
                ", ".join(f"{x['length']}: {x['offset']}" for x in p["lengths"]) for p in probes
            ),
            "scored per condition": _distinct(
                f"{p['samples']} test examples" if kind == "synthetic" else f"{p['reference']['tokens']} test tokens"
                for p in probes
            ),
            "attention measured on": _distinct(
                f"{p['attention_samples']} examples" if kind == "synthetic" else f"{p['attention_tokens']} tokens"
                for p in probes
            ),
            "score s": SCORES[kind] if kind == "lm" else "exact match",
            "minimum drop s_L - s_E": f"{MIN_DROP[kind]:g}",
        }
        for name, value in rows.items():
            cells.setdefault(name, []).append(value)
    return TableData("Protocol (from the counted records)", ["", *tasks], [[k, *v] for k, v in cells.items()])


def invariant_encodings(records: list[dict[str, Any]]) -> list[str]:
    """The encodings of ``records`` whose class is ``translation_invariant`` (scores
    depend on positions only through their differences; ``NAME+randpos`` as ``NAME``):
    for them ``shifted`` changes no score, so its recovery is 1 up to rounding."""
    names = dict.fromkeys(r["encoding"] for r in records)
    return [n for n in names if get(n.removesuffix(RANDPOS)).translation_invariant]


def provenance(records: list[dict[str, Any]], label: str = RECORDS_LABEL) -> str:
    """The records' provenance as a list: file and lines read, commits, environment."""
    commits = Counter(r["git_commit"] for r in records)
    return "\n".join(
        [
            f"- records: the first {len(records)} lines of `{label}` (records are only appended)",
            "- written at commit " + ", ".join(f"`{c}` ({n} records)" for c, n in commits.items()),
            f"- torch {_distinct(r['torch_version'] for r in records)}, CPU capability "
            f"{_distinct(r['cpu_capability'] for r in records)}, training step "
            f"{_distinct(r['train_step'] for r in records)}, "
            f"{_distinct(r['config']['train']['threads'] for r in records)} thread(s) per run",
        ]
    )


def counting(records: list[dict[str, Any]], grid: Iterable[float] = LR_GRID) -> str:
    """Which of ``records`` count and why the others do not (``counted_records``), and
    a table of the counted runs: learning rate and in-distribution score."""
    grid = tuple(grid)
    counted, left_out = counted_records(records, grid=grid)
    lines = [
        f"- read: {len(records)} records; counted: {len(counted)} (probes, a complete learning-rate sweep over "
        f"{', '.join(f'{lr:g}' for lr in grid)}, the sweep's chosen rate, exact match over lengths 1..L at "
        f"least {LEARNED_BAR} for synthetic tasks)"
    ]
    if left_out["no probes"]:
        lines.append(f"- left out, no probes: {_records(len(left_out['no probes']))}")
    pairs: dict[str, set] = {}
    for r in left_out["sweep incomplete"]:
        pairs.setdefault(f"{r['task']}/{r['encoding']}", set()).add(run_lr(r))
    if pairs:
        named = ", ".join(f"{p} ({len(rates)} of {len(grid)} rates)" for p, rates in pairs.items())
        lines.append(
            f"- left out, sweep incomplete (the chosen rate is not known yet): "
            f"{_records(len(left_out['sweep incomplete']))}: {named}"
        )
    if left_out["not chosen"]:
        lines.append(f"- left out, a rate the sweep did not choose: {_records(len(left_out['not chosen']))}")
    if left_out["did not learn"]:
        runs = ", ".join(
            f"{r['task']}/{r['encoding']} seed {r['seed']} lr {_lr(r)} ({in_distribution(r):.3f})"
            for r in left_out["did not learn"]
        )
        lines.append(f"- left out, did not learn in distribution (exact match over 1..L): {runs}")
    rows = []
    for task, by_enc in group(counted).items():
        for enc, recs in by_enc.items():
            rate = _distinct(_lr(r) for r in recs)
            seeds = ", ".join(str(r["seed"]) for r in recs)
            ind = (
                "-"
                if "exact_match" not in recs[0]["metrics"][0]
                else _distinct(f"{in_distribution(r):.3f}" for r in recs)
            )
            rows.append([task, enc, seeds, rate, ind])
    table = TableData(
        "The counted runs: seeds, learning rate, exact match over lengths 1..L (synthetic tasks)",
        ["task", "encoding", "seeds", "lr", "exact match 1..L"],
        rows,
    )
    return "\n".join(lines) + ("\n\n" + to_markdown([table]) if rows else "\n")


def page_blocks(records: list[dict[str, Any]], img: str = "img", grid: Iterable[float] = LR_GRID) -> dict[str, str]:
    """The text of every generated block (``BLOCKS``) from the records read;
    ``img``: the figures' folder, relative to the page."""
    counted, _ = counted_records(records, grid=grid)
    none = "No counted record yet.\n"
    tasks = _tasks(counted)
    invariant = (
        "Counted encodings whose class is `translation_invariant` (`shifted` changes none of their scores): "
        + (", ".join(invariant_encodings(counted)) or "none")
        + ".\n"
    )
    legend = f"Attribution labels: {attribution_legend(BAR)}.\n"
    summary = attribution_table(counted)
    claims = hypothesis_table(counted)
    figures = [f"![{t}]({img}/mechanisms_{safe_filename(t)}.png)" for t in tasks]
    return {
        "provenance": provenance(records),
        "counting": counting(records, grid),
        "protocol": to_markdown([protocol_table(counted)]) + "\n" + invariant if counted else none,
        "recovery": to_markdown(recovery_tables(counted)) if counted else none,
        "attribution": legend + "\n" + to_markdown([summary]) if summary is not None else none,
        "claims": to_markdown([claims]) if claims is not None else none,
        "attention": to_markdown(attention_table(counted)) if counted else none,
        "figures": "\n\n".join(figures) + "\n" if figures else none,
    }


def quote(records: list[dict[str, Any]], spec: str, grid: Iterable[float] = LR_GRID) -> str:
    """The text of the quote ``spec`` (``KIND ARGS``) from the records read:

    * ``records``: how many records were read (the page's ``N``);
    * ``counted``: how many of them count (``counted_records``);
    * ``tasks``: the tasks of the counted records, comma-separated;
    * ``explained LABEL TASK``: of ``TASK``'s cells with a drop, how many the attribution
      ``LABEL`` explains (``hypothesis_table``), e.g. ``12 of 51``;
    * ``max TASK INTERVENTION FACTOR``: the largest mean recovery (over the seeds with a
      drop) of ``INTERVENTION`` at ``E = FACTOR L`` among the counted encodings of
      ``TASK``, two decimals; ``no drop`` when no encoding has a drop there.
    """
    kind, *args = spec.split()
    try:
        if kind == "records" and not args:
            return str(len(records))
        counted, _ = counted_records(records, grid=grid)
        if kind == "counted" and not args:
            return str(len(counted))
        if kind == "tasks" and not args:
            return ", ".join(_tasks(counted)) or "none"
        if kind == "explained" and len(args) == 2:
            label, task = args
            names = {h[0]: h[1] for h in HYPOTHESES} | {"unexplained": "none of the three"}
            if label not in names:
                raise ValueError(f"unknown label {label!r} (one of {list(names)})")
            table = hypothesis_table([r for r in counted if r["task"] == task])
            if table is None:
                raise ValueError(f"no counted record of task {task!r}")
            return next(row[3] for row in table.rows if row[0] == names[label])
        if kind == "max" and len(args) == 3:
            task, intervention, factor = args
            if intervention not in INTERVENTIONS:
                raise ValueError(f"unknown intervention {intervention!r} (one of {list(INTERVENTIONS)})")
            data = figure_data(counted, task)
            e = int(factor) * data.train_length
            if e not in data.lengths:
                raise ValueError(f"E = {factor}L was not probed on {task!r} (lengths {data.lengths})")
            values = [r[e][intervention] for r in data.recovery.values() if r.get(e) is not None]
            return f"{max(values):.2f}" if values else "no drop"
    except (ValueError, KeyError) as err:
        raise ValueError(f"quote {spec!r}: {err}") from None
    raise ValueError(
        f"quote {spec!r}: unknown kind or arguments "
        "(records, counted, tasks, explained LABEL TASK, max TASK INTERVENTION FACTOR)"
    )


def render_page(page: str, records: list[dict[str, Any]], grid: Iterable[float] = LR_GRID) -> str:
    """``page`` with every generated block and quote recomputed from ``records`` (the
    first ``N`` lines); a ``ValueError`` names a block that is missing, repeated or
    unknown, or a bad quote."""
    grid = tuple(grid)
    return fill_page(page, page_blocks(records, grid=grid), lambda spec: quote(records, spec, grid))


def write_mechanisms_page(
    count: int | None = None,
    records: str | Path = RECORDS,
    page: str | Path = PAGE,
    img_dir: str | Path | None = None,
) -> list[Path]:
    """Rewrite ``page``'s generated blocks and quotes from the first ``count`` lines of
    ``records`` (default: every line; give the committed count, so that the page's test
    finds them in a clean checkout) and draw its figures into ``img_dir`` (default
    ``<page folder>/img``). Returns the paths written."""
    recs = read_first(records, count)
    counted, _ = counted_records(recs, grid=LR_GRID)
    page = Path(page)
    img_dir = Path(img_dir) if img_dir is not None else page.parent / "img"
    written = [
        plot_mechanisms(figure_data(counted, t), img_dir / f"mechanisms_{safe_filename(t)}.png")
        for t in _tasks(counted)
    ]
    page.write_text(render_page(page.read_text(encoding="utf-8"), recs), encoding="utf-8")
    return [*written, page]


# -- the HTML report's section ------------------------------------------------------------------------


def mechanisms_report_section(
    records: list[dict[str, Any]], *, grid: Iterable[float] | None = None
) -> dict[str, Any] | None:
    """A section for ``posenc.pipeline.report.write_report(..., extra_sections=[...])``
    from a study's records: the recovery, attribution and attention tables and one
    figure per task, of the records ``counted_records(records, grid=grid)`` keeps
    (``grid`` default: the records' own learning rates). ``None`` when no record carries
    probes."""
    if not any(r.get("probes") for r in records):
        return None
    counted, left_out = counted_records(records, grid=grid)
    skipped = ", ".join(f"{len(v)} {k}" for k, v in left_out.items() if v)
    text = (
        "At each test length E > L, the share of the drop from L to E that each evaluation-time intervention "
        "recovers, (s_c - s_E) / (s_L - s_E): shifted (inputs of length L at the positions of the end of length "
        "E: unseen positions), window (every query sees its last W = T(L) keys: unseen distances and dilution), "
        "temperature (the scores times log T(E) / log T(L): dilution) and both. "
        f"{len(counted)} of {len(records)} records count" + (f" (left out: {skipped})" if skipped else "") + ". "
        f"Attribution labels: {attribution_legend(BAR)}."
    )
    tables: list[TableData] = []
    figures = []
    if counted:
        tables = [*recovery_tables(counted)]
        summary = attribution_table(counted)
        tables += [summary] if summary is not None else []
        claims = hypothesis_table(counted)
        tables += [claims] if claims is not None else []
        tables += attention_table(counted)
        figures = [
            (f"{t}: recovered share per intervention and attention entropy", figure_mechanisms(figure_data(counted, t)))
            for t in _tasks(counted)
        ]
    return {
        "title": "Why encodings fail past L: mechanism probes",
        "text": text,
        "tables": [{"caption": t.title, "columns": t.columns, "rows": t.rows} for t in tables],
        "figures": figures,
    }
