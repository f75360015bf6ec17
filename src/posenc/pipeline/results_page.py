"""The section "Results" of docs/results.md, from the first ``N`` records of
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
from posenc.experiments.published import (
    kazemnejad_ranks,
    press_sliding_table,
    press_table,
    published_tables,
    randpos_lm_table,
    randpos_table,
)
from posenc.experiments.study import StudyPlan, plan_phases, presets
from posenc.experiments.summary import (
    TableData,
    group,
    is_lm,
    learned,
    mean_ranks,
    not_learned,
    not_learned_note,
    selected,
    sweep_table,
    to_markdown,
)
from posenc.pipeline.extension_page import fill_page
from posenc.pipeline.mechanisms_page import RECORDS, provenance, read_first
from posenc.viz.study import plot_task, safe_filename

PAGE = Path(__file__).resolve().parents[3] / "docs" / "results.md"
BLOCKS = (
    "current-provenance",
    "current-progress",
    "current-figures",
    "current-sweep",
    "current-learned",
    "current-intervals",
    "current-ranks",
    "current-t5-max-distance",
    "current-papers",
    "current-time",
)
#: The preset whose records the section shows.
PRESET = "full"
#: The T5 experiment's records: shakespeare's t5 runs of the study (each seed at its
#: chosen rate) retrained with ``max_distance`` 64 (docs/configs/shakespeare_t5_max_distance_64.yaml).
T5_EXPERIMENT = RECORDS.parent / "t5_md64_results.jsonl"
#: The experiment's row label in its table.
T5_CAPPED = "t5 (max_distance 64)"


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


def figure_runs(records: list[dict[str, Any]], task: str) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """``(by_enc, metric)`` of ``task``'s figure: the chosen rate's runs of each encoding
    (``selected``: randomized runs at their randomized test positions) and the metric of
    its interval table, sliding-window perplexity for a corpus; for a synthetic task exact
    match of the runs that learned in distribution only (an encoding none of whose runs
    learned is left out, as in the interval table)."""
    by_enc = group(selected([r for r in records if r["task"] == task])).get(task, {})
    if not by_enc:
        raise ValueError(f"no records of task {task!r}")
    if is_lm(next(iter(by_enc.values()))):
        return by_enc, "ppl_sliding"
    kept = {enc: [r for r in recs if learned(r)] for enc, recs in by_enc.items()}
    return {enc: recs for enc, recs in kept.items() if recs}, "exact_match"


def figure_path(img_dir: str | Path, task: str) -> Path:
    """Where ``write_results_page`` draws ``task``'s figure."""
    return Path(img_dir) / f"results_{safe_filename(task)}.png"


def figures_block(tasks: list[str]) -> str:
    """The figure of every shown task (``figure_runs``), linked from the page's folder."""
    if not tasks:
        return "No task has all its runs in the records yet.\n"
    lines = [
        "Each line is the mean over an encoding's runs, the band their range; synthetic tasks: exact match of "
        "the runs that learned in distribution; corpora: sliding-window perplexity (log scale).",
        "",
    ]
    lines += [f"![{task}]({figure_path('img', task).as_posix()})" for task in tasks]
    return "\n".join(lines) + "\n"


def t5_experiment_table(records: list[dict[str, Any]], experiment: list[dict[str, Any]]) -> TableData | None:
    """Shakespeare's t5 runs of ``records`` (the chosen rate's; shakespeare must be
    complete in them) beside the same configs with T5's ``max_distance`` 64: one
    sliding-perplexity interval table (``interval_tables``), rows ``t5`` and
    ``T5_CAPPED``. ``None`` when the experiment has no record."""
    if not experiment:
        return None
    study = [r for r in records if r["task"] == "shakespeare" and r["encoding"] == "t5"]
    (table,) = interval_tables(study + [r | {"encoding": T5_CAPPED} for r in experiment])
    return table


def read_experiment(path: str | Path = T5_EXPERIMENT) -> list[dict[str, Any]]:
    """Every record of the T5 experiment's results file (none when it does not exist)."""
    return read_first(path, None) if Path(path).is_file() else []


def page_blocks(records: list[dict[str, Any]], cache: dict[str, Any] | None = None) -> dict[str, str]:
    """The text of every generated block (``BLOCKS``) from the records read; ``cache``
    shares what the quotes of the same render read too (``quote``)."""
    cache = {} if cache is None else cache
    tasks = _complete(records, cache)
    shown = [r for r in records if r["task"] in tasks]
    none = "No task has all its runs in the records yet.\n"
    sweep = sweep_table(shown) if shown else None
    unlearned = not_learned(shown)
    papers = published_tables(shown) if shown else []
    intervals = interval_tables(shown) if shown else []
    for table in intervals:  # the quotes' cells (``_interval_table``) are these tables' cells
        cache.setdefault(table.task, table)
    return {
        "current-provenance": provenance(records),
        "current-progress": to_markdown([progress_table(records)]),
        "current-figures": figures_block(tasks),
        "current-sweep": to_markdown([sweep]) if sweep is not None else none,
        "current-learned": (
            (not_learned_note(unlearned) if unlearned else "Every shown run learned its task in distribution.") + "\n"
            if shown
            else none
        ),
        "current-intervals": to_markdown(intervals) if shown else none,
        "current-ranks": to_markdown([ranks]) if (ranks := mean_ranks(shown) if shown else None) else none,
        "current-t5-max-distance": to_markdown([t5]) if (t5 := _t5(records, cache)) else "No record yet.\n",
        "current-papers": to_markdown(papers) if papers else "No comparison with a paper yet.\n",
        "current-time": to_markdown([time_table(records)]) if records else "No record yet.\n",
    }


def _complete(records: list[dict[str, Any]], cache: dict[str, Any]) -> list[str]:
    """``complete_tasks(records)``, computed once per ``cache`` (one page render)."""
    if "complete" not in cache:
        cache["complete"] = complete_tasks(records)
    return cache["complete"]


def _check_shown(records: list[dict[str, Any]], task: str, spec: str, cache: dict[str, Any]) -> None:
    """Refuse a quote of a task not all of whose runs are in ``records``."""
    if task not in _complete(records, cache):
        raise ValueError(f"quote {spec!r}: task {task!r} is not shown (not all its runs are in the records)")


def _interval_table(records: list[dict[str, Any]], task: str, spec: str, cache: dict[str, Any]) -> TableData:
    """``task``'s interval table, computed once per ``cache`` (one page render)."""
    _check_shown(records, task, spec, cache)
    if task not in cache:
        (cache[task],) = interval_tables([r for r in records if r["task"] == task])
    return cache[task]


def _t5(records: list[dict[str, Any]], cache: dict[str, Any]) -> TableData | None:
    """The T5 experiment's table, computed once per ``cache``; ``None`` while
    shakespeare is not shown or the experiment has no record."""
    if "t5" not in cache:
        shown = "shakespeare" in _complete(records, cache)
        cache["t5"] = t5_experiment_table(records, read_experiment()) if shown else None
    return cache["t5"]


def _column(table: TableData, column: str, spec: str) -> int:
    if column not in table.columns:
        raise ValueError(f"quote {spec!r}: no column {column!r} (columns {table.columns})")
    return table.columns.index(column)


#: The tables a ``table`` quote reads, and whether a quote names a task (press: one
#: table per corpus; randpos: rows start with the task).
QUOTED_TABLES = {
    "ranks": (mean_ranks, False),
    "press": (press_table, True),
    "press-sliding": (press_sliding_table, True),
    "kazemnejad": (kazemnejad_ranks, False),
    "randpos": (randpos_table, True),
    "randpos-lm": (randpos_lm_table, True),
}


def _table_cell(records: list[dict[str, Any]], args: list[str], spec: str, cache: dict[str, Any]) -> str:
    """The cell of a ``table NAME [TASK] ENCODING COLUMN`` quote (``_`` in ``COLUMN``
    stands for a space), from that table over the shown tasks' records."""
    name, *rest = args
    if name not in QUOTED_TABLES or len(rest) != (3 if QUOTED_TABLES[name][1] else 2):
        raise ValueError(
            f"quote {spec!r}: use table press|press-sliding|randpos|randpos-lm TASK ENCODING COLUMN "
            "or table kazemnejad|ranks ENCODING COLUMN"
        )
    complete = _complete(records, cache)
    make, by_task = QUOTED_TABLES[name]
    task = rest[0] if by_task else None
    if task is not None:
        _check_shown(records, task, spec, cache)
    key = ("table", name)
    if key not in cache:
        shown = [r for r in records if r["task"] in complete]
        made = make(shown) if shown else None
        cache[key] = made if isinstance(made, list) else [made] if made is not None else []
    tables = cache[key]
    if name.startswith("press"):  # one table per corpus, rows start with the encoding
        tables = [t for t in tables if f" vs {task} " in t.title]
    # a row is found by its encoding, or by (task, encoding) where the rows start with the task
    keys = 2 if by_task and not name.startswith("press") else 1
    want, column = rest[-1 - keys : -1], rest[-1].replace("_", " ")
    for table in tables:
        col = _column(table, column, spec)
        for row in table.rows:
            if row[:keys] == want:
                return row[col]
    raise ValueError(f"quote {spec!r}: no such row in the {name} table")


def quote(records: list[dict[str, Any]], spec: str, cache: dict[str, Any] | None = None) -> str:
    """The text of the quote ``spec`` (``KIND ARGS``); ``cache`` keeps the interval tables
    between the quotes of one page:

    * ``records``: how many records were read (the page's ``N``);
    * ``complete``: the shown tasks, comma-separated, or "none";
    * ``cell TASK ENCODING COLUMN``: that cell of ``TASK``'s interval table (a shown task;
      ``_`` in ``COLUMN`` for a space, e.g. ``cell recall cope runs_learned``);
    * ``learned TASK SEED``: how many of the task's encodings learned it in distribution
      on that seed at the chosen rate, as "k of n" (``summary.learned``);
    * ``best TASK COLUMN``: the cell with the best estimate in that column (the largest
      exact match, the lowest perplexity) and its encoding, or the estimate and how many
      encodings share it;
    * ``chosen TASK WHERE``: how many of the task's swept encodings chose the ``lowest``
      or ``highest`` rate tried (or one ``inside`` the grid), as "k of n" (the sweep
      table's "chosen at" column);
    * ``table NAME [TASK] ENCODING COLUMN``: a cell of a comparison with a paper or of
      the mean ranks (``QUOTED_TABLES``; ``_`` in ``COLUMN`` for a space), e.g.
      ``table press shakespeare alibi ours_8L``;
    * ``t5-capped COLUMN``: the T5 experiment's cell (``t5_experiment_table``).
    """
    cache = {} if cache is None else cache
    kind, *args = spec.split()
    if kind == "records" and not args:
        return str(len(records))
    if kind == "complete" and not args:
        return ", ".join(_complete(records, cache)) or "none"
    if kind == "cell" and len(args) == 3:
        table = _interval_table(records, args[0], spec, cache)
        col = _column(table, args[2].replace("_", " "), spec)
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
    if kind == "learned" and len(args) == 2 and args[1].isdigit():
        _check_shown(records, args[0], spec, cache)
        runs = [r for r in selected(records) if r["task"] == args[0] and r["seed"] == int(args[1])]
        if not runs:
            raise ValueError(f"quote {spec!r}: no run of seed {args[1]}")
        return f"{sum(learned(r) for r in runs)} of {len(runs)}"
    if kind == "t5-capped" and len(args) == 1:
        table = _t5(records, cache)
        if table is None:
            raise ValueError(f"quote {spec!r}: no T5 experiment (shakespeare not shown, or no record)")
        return next(r for r in table.rows if r[0] == T5_CAPPED)[_column(table, args[0], spec)]
    if kind == "table" and args:
        return _table_cell(records, args, spec, cache)
    raise ValueError(
        f"quote {spec!r}: unknown kind or arguments (records, complete, cell TASK ENCODING COLUMN, "
        "best TASK COLUMN, chosen TASK lowest|highest|inside, learned TASK SEED, table NAME [TASK] ENCODING COLUMN, "
        "t5-capped COLUMN)"
    )


def render_page(page: str, records: list[dict[str, Any]]) -> str:
    """``page`` with every generated block and quote recomputed from ``records``; a
    ``ValueError`` names a block that is missing, repeated or unknown."""
    cache: dict[str, Any] = {}
    return fill_page(page, page_blocks(records, cache), lambda spec: quote(records, spec, cache))


def write_results_page(
    count: int | None = None,
    records: str | Path = RECORDS,
    page: str | Path = PAGE,
    img_dir: str | Path | None = None,
) -> list[Path]:
    """Rewrite ``page``'s generated blocks and quotes from the first ``count`` lines of
    ``records`` (default: every line; give the committed count, so that the page's test
    finds them in a clean checkout) and draw each shown task's figure into ``img_dir``
    (default ``<page folder>/img``). Returns the paths written, the page last."""
    page = Path(page)
    recs = read_first(records, count)
    img_dir = Path(img_dir) if img_dir is not None else page.parent / "img"
    written = []
    for task in complete_tasks(recs):
        by_enc, metric = figure_runs(recs, task)
        written.append(plot_task(task, by_enc, metric, figure_path(img_dir, task)))
    page.write_text(render_page(page.read_text(encoding="utf-8"), recs), encoding="utf-8")
    return [*written, page]
