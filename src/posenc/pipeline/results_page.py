"""The current protocol's section of docs/results.md, from the first ``N`` records of
``docs/data/study_results.jsonl`` (the full preset's re-run appends to that file as its
runs finish).

Only tasks whose full-preset runs are all in the records are shown (``complete_tasks``:
both phases of ``plan_phases("full", tasks=[task])``), so a shown number never changes
when later runs arrive. The generated text, between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` lines (``BLOCKS``) and in quotes
``<!--q KIND-->value<!--/q-->`` (``quote``), is rewritten by ``render_page`` and checked
by ``tests/test_results_doc.py`` (any difference fails).

Regenerate it from the committed records::

    python -c "from posenc.pipeline.results_page import write_results_page; \\
write_results_page(count=$(git show HEAD:docs/data/study_results.jsonl | wc -l))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posenc.experiments.config import TASKS
from posenc.experiments.intervals import interval_tables
from posenc.experiments.published import published_tables
from posenc.experiments.study import StudyPlan, plan_phases, presets
from posenc.experiments.summary import TableData, not_learned, not_learned_note, sweep_table, to_markdown
from posenc.pipeline.extension_page import fill_page
from posenc.pipeline.mechanisms_page import RECORDS, provenance, read_first

PAGE = Path(__file__).resolve().parents[3] / "docs" / "results.md"
BLOCKS = (
    "current-provenance",
    "current-progress",
    "current-sweep",
    "current-learned",
    "current-intervals",
    "current-papers",
    "current-time",
)
#: The preset whose records the section shows.
PRESET = "full"


def _plans() -> dict[str, StudyPlan]:
    """The full preset's plan of each of its tasks, in ``TASKS`` order."""
    tasks = sorted(presets()[PRESET].tasks, key=TASKS.index)
    return {t: plan_phases(PRESET, tasks=[t]) for t in tasks}


def _progress(records: list[dict[str, Any]]) -> list[tuple[str, StudyPlan, int, int | None]]:
    """Per task of the full preset: ``(task, plan, phase 1 finished, phase 2 finished or
    None while phase 1 is not)``."""
    done = {r["run_id"] for r in records}
    out = []
    for task, plan in _plans().items():
        first = sum(c.run_id in done for c in plan.first)
        second = None if first < len(plan.first) else sum(c.run_id in done for c in plan.second_phase(records))
        out.append((task, plan, first, second))
    return out


def complete_tasks(records: list[dict[str, Any]]) -> list[str]:
    """The tasks of the full preset all of whose runs (both phases) are in ``records``."""
    return [task for task, plan, _, second in _progress(records) if second == len(plan.later)]


def progress_table(records: list[dict[str, Any]]) -> TableData:
    """Per task of the full preset: runs of phase 1 (the sweep) and phase 2 (the other
    seeds at the chosen rate) finished of planned, and whether the task is shown."""
    rows = [
        [
            task,
            f"{first} of {len(plan.first)}",
            "after phase 1" if second is None else f"{second} of {len(plan.later)}",
            "yes" if second == len(plan.later) else "not yet",
        ]
        for task, plan, first, second in _progress(records)
    ]
    return TableData(
        "Runs of the full preset in the records read, per task (a task is shown once both phases are in)",
        ["task", "phase 1 (sweep, seed 0)", "phase 2 (seeds 1, 2)", "shown"],
        rows,
    )


def time_table(records: list[dict[str, Any]]) -> TableData:
    """The run time of the records read, per task: each record's ``wall_time_s``
    (training and evaluation, one thread per run, so core-seconds), and the full
    preset's planned runs at the task's mean."""
    rows = []
    total_h, planned_h = 0.0, 0.0
    plans = _plans()
    for task, plan in plans.items():
        times = [float(r["wall_time_s"]) for r in records if r["task"] == task]
        if not times:
            continue
        runs = len(plan.first) + len(plan.later)
        mean = sum(times) / len(times)
        total_h += sum(times) / 3600
        planned_h += mean * runs / 3600
        rows.append(
            [
                task,
                str(len(times)),
                f"{mean:.0f} s",
                f"{min(times):.0f}–{max(times):.0f} s",
                f"{sum(times) / 3600:.2f}",
                f"{mean * runs / 3600:.2f}",
            ]
        )
    rows.append(["all read", str(sum(int(r[1]) for r in rows)), "", "", f"{total_h:.2f}", f"{planned_h:.2f}"])
    return TableData(
        "Run time per task (wall_time_s: training and evaluation, one thread per run, so core time)",
        [
            "task",
            "runs read",
            "mean per run",
            "min–max",
            "core-hours read",
            "core-hours of the task's planned runs at that mean",
        ],
        rows,
    )


def page_blocks(records: list[dict[str, Any]]) -> dict[str, str]:
    """The text of every generated block (``BLOCKS``) from the records read."""
    tasks = complete_tasks(records)
    shown = [r for r in records if r["task"] in tasks]
    none = "No task has all its runs in the records yet.\n"
    sweep = sweep_table(shown) if shown else None
    unlearned = not_learned(shown)
    papers = published_tables(shown) if shown else []
    return {
        "current-provenance": provenance(records),
        "current-progress": to_markdown([progress_table(records)]),
        "current-sweep": to_markdown([sweep]) if sweep is not None else none,
        "current-learned": (
            (not_learned_note(unlearned) if unlearned else "Every shown run learned its task in distribution.") + "\n"
            if shown
            else none
        ),
        "current-intervals": to_markdown(interval_tables(shown)) if shown else none,
        "current-papers": to_markdown(papers) if papers else "No comparison with a paper yet.\n",
        "current-time": to_markdown([time_table(records)]) if records else "No record yet.\n",
    }


def _check_shown(records: list[dict[str, Any]], task: str, spec: str, cache: dict[str, Any]) -> None:
    """Refuse a quote of a task not all of whose runs are in ``records`` (the complete
    tasks computed once per ``cache``, one page render)."""
    if "complete" not in cache:
        cache["complete"] = complete_tasks(records)
    if task not in cache["complete"]:
        raise ValueError(f"quote {spec!r}: task {task!r} is not shown (not all its runs are in the records)")


def _interval_table(records: list[dict[str, Any]], task: str, spec: str, cache: dict[str, Any]) -> TableData:
    """``task``'s interval table, computed once per ``cache`` (one page render)."""
    _check_shown(records, task, spec, cache)
    if task not in cache:
        (cache[task],) = interval_tables([r for r in records if r["task"] == task])
    return cache[task]


def _column(table: TableData, column: str, spec: str) -> int:
    if column not in table.columns:
        raise ValueError(f"quote {spec!r}: no column {column!r} (columns {table.columns})")
    return table.columns.index(column)


def quote(records: list[dict[str, Any]], spec: str, cache: dict[str, Any] | None = None) -> str:
    """The text of the quote ``spec`` (``KIND ARGS``); ``cache`` keeps the interval tables
    between the quotes of one page:

    * ``records``: how many records were read (the page's ``N``);
    * ``complete``: the shown tasks, comma-separated, or "none";
    * ``cell TASK ENCODING COLUMN``: that cell of ``TASK``'s interval table (a shown task);
    * ``best TASK COLUMN``: the cell with the best estimate in that column (the largest
      exact match, the lowest perplexity) and its encoding, or the estimate and how many
      encodings share it;
    * ``chosen TASK WHERE``: how many of the task's swept encodings chose the ``lowest``
      or ``highest`` rate tried (or one ``inside`` the grid), as "k of n" (the sweep
      table's "chosen at" column).
    """
    cache = {} if cache is None else cache
    kind, *args = spec.split()
    if kind == "records" and not args:
        return str(len(records))
    if kind == "complete" and not args:
        return ", ".join(complete_tasks(records)) or "none"
    if kind == "cell" and len(args) == 3:
        table = _interval_table(records, args[0], spec, cache)
        col = _column(table, args[2], spec)
        row = next((r for r in table.rows if r[0] == args[1]), None)
        if row is None:
            raise ValueError(f"quote {spec!r}: no row {args[1]!r}")
        return row[col]
    if kind == "best" and len(args) == 2:
        table = _interval_table(records, args[0], spec, cache)
        col = _column(table, args[1], spec)
        cells = [(float(r[col].split()[0]), r[0], r[col]) for r in table.rows if r[col][:1].isdigit()]
        if not cells:
            raise ValueError(f"quote {spec!r}: no encoding has a number in column {args[1]!r}")
        best = (max if table.higher_is_better else min)(c[0] for c in cells)
        top = [c for c in cells if c[0] == best]
        return f"{top[0][2]} ({top[0][1]})" if len(top) == 1 else f"{best:.2f} ({len(top)} encodings)"
    if kind == "chosen" and len(args) == 2 and args[1] in ("lowest", "highest", "inside"):
        _check_shown(records, args[0], spec, cache)
        table = sweep_table([r for r in records if r["task"] == args[0]])
        wheres = [row[-1] for row in table.rows] if table else []
        if not wheres:
            raise ValueError(f"quote {spec!r}: no learning-rate sweep for {args[0]!r}")
        hits = sum(w.startswith(args[1]) for w in wheres)
        return f"{hits} of {len(wheres)}"
    raise ValueError(
        f"quote {spec!r}: unknown kind or arguments (records, complete, cell TASK ENCODING COLUMN, "
        "best TASK COLUMN, chosen TASK lowest|highest|inside)"
    )


def render_page(page: str, records: list[dict[str, Any]]) -> str:
    """``page`` with every generated block and quote recomputed from ``records``; a
    ``ValueError`` names a block that is missing, repeated or unknown."""
    cache: dict[str, Any] = {}
    return fill_page(page, page_blocks(records), lambda spec: quote(records, spec, cache))


def write_results_page(count: int | None = None, records: str | Path = RECORDS, page: str | Path = PAGE) -> Path:
    """Rewrite ``page``'s generated blocks and quotes from the first ``count`` lines of
    ``records`` (default: every line; give the committed count, so that the page's test
    finds them in a clean checkout). Returns the page's path."""
    if count is None:
        with Path(records).open(encoding="utf-8") as fh:
            count = sum(1 for line in fh if line.endswith("\n"))
    page = Path(page)
    page.write_text(render_page(page.read_text(encoding="utf-8"), read_first(records, count)), encoding="utf-8")
    return page
