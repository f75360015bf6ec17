"""``posenc compare NAME``: train only NAME's runs of a preset and rank NAME among
baseline records (``posenc.experiments.compare`` plans and checks them).

The run folder (default ``runs/compare-NAME``) holds NAME's runs (``results.jsonl``,
``checkpoints/``; a re-run skips finished ones), ``compare.md`` (NAME's standings, then
the study's tables of the merged records) and ``leaderboard/``: the merged records as a
study folder (``results.jsonl``, ``results.md``, ``plots/`` and, unless ``report=False``,
``report.html``), written by ``posenc.pipeline.study.write_study_outputs``, so
``posenc study --summarize-only --out <run folder>/leaderboard`` and ``posenc report
--study <run folder>/leaderboard`` work on it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posenc.experiments import distributed
from posenc.experiments.compare import Comparison, leaderboard_tables, merge, plan_compare
from posenc.experiments.parallel import plan_jobs, run_study_parallel
from posenc.experiments.results import RESULTS_FILE, atomic_write_bytes, read_results
from posenc.experiments.study import run_study
from posenc.experiments.summary import TableData, to_markdown
from posenc.pipeline.study import write_study_outputs
from posenc.viz.study import safe_filename

#: ``hooks(configs, label, parallel)`` -> the progress hooks of ``run_study``/``run_study_parallel``.
HooksFactory = Callable[[list, str, bool], dict[str, Any]]


def compare_dir(name: str) -> Path:
    """The default run folder of ``posenc compare NAME``: ``runs/compare-NAME``."""
    return Path("runs") / f"compare-{safe_filename(name)}"


def run_compare(
    name: str,
    preset: str = "full",
    *,
    baselines: str | Path | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    out: str | Path | None = None,
    threads: int | None = None,
    jobs: int | None = None,
    report: bool = True,
    hooks: HooksFactory | None = None,
    say: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Plan and check (``plan_compare``), train NAME's unfinished runs (``jobs`` worker
    processes, as ``posenc study --jobs``; with the preset's learning-rate sweep, phase 1
    then phase 2), merge them with the baselines and write the outputs
    (``write_compare_outputs``); returns what that returns."""
    if distributed.launched():
        raise ValueError("posenc compare does not run under torchrun; use --jobs for several processes")
    run_dir = Path(out) if out else compare_dir(name)
    request = dict(baselines=baselines, tasks=tasks, seeds=seeds)
    comparison = plan_compare(name, preset, **request, threads=threads)
    pending = comparison.plan.pending(read_results(run_dir))
    jobs, run_threads, note = plan_jobs(jobs, threads, pending)
    if run_threads != threads:
        comparison = plan_compare(name, preset, **request, threads=run_threads)
    say(
        f"compare {comparison.name!r} ({preset} preset): {len(comparison.configs)} run(s) into {run_dir} "
        f"({pending} to train), ranked among {len(comparison.baselines)} baseline records of "
        f"{len({r['encoding'] for r in comparison.baselines})} encodings from {comparison.source}"
    )
    for line in comparison.plan.describe(read_results(run_dir)):
        say(line)
    if note:
        say(f"note: {note}")
    parallel = jobs > 1 and pending > 0
    label = f"runs ({jobs} processes x {comparison.configs[0].train.threads} threads)" if parallel else "runs"
    progress = hooks(comparison.configs, label, parallel) if hooks is not None else {}
    if parallel:
        records = run_study_parallel(comparison.plan, run_dir, jobs, **progress)
    else:
        records = run_study(comparison.plan, run_dir, **progress)
    return write_compare_outputs(run_dir, comparison, merge(comparison, records), report=report)


def write_compare_outputs(
    run_dir: str | Path, comparison: Comparison, merged: list[dict[str, Any]], *, report: bool = True
) -> dict[str, Any]:
    """``compare.md`` and the ``leaderboard/`` study folder of the merged records.
    Returns ``{"markdown", "tables", "leaderboard", "plots", "report", "records"}``."""
    run_dir = Path(run_dir)
    board = run_dir / "leaderboard"
    text = "".join(json.dumps(r, sort_keys=False, allow_nan=False) + "\n" for r in merged)
    atomic_write_bytes(board / RESULTS_FILE, text.encode("utf-8"))
    study = write_study_outputs(board, merged, report=report)
    tables = leaderboard_tables(comparison.name, merged)
    (run_dir / "compare.md").write_text(compare_markdown(comparison, tables, study), encoding="utf-8")
    return {
        "markdown": run_dir / "compare.md",
        "tables": tables,
        "leaderboard": board,
        "plots": study["plots"],
        "report": study["report"],
        "records": merged,
    }


def compare_markdown(comparison: Comparison, tables: list[TableData], study: dict[str, Any]) -> str:
    """The text of ``compare.md``."""
    c = comparison
    encodings = sorted({r["encoding"] for r in c.baselines})
    lines = [
        f"# {c.name} against the baselines",
        "",
        f"`{c.name}`: {len(c.configs)} run{'s' * (len(c.configs) != 1)} of the `{c.preset}` preset, trained here; "
        "baselines: "
        f"{len(c.baselines)} records of {len(encodings)} encodings ({', '.join(encodings)}) from `{c.source}`. "
        "Every baseline record of a task and seed was checked to have the same task, model and train "
        "settings as this encoding's run, except the encoding itself.",
    ]
    if c.outside or c.replaced:
        lines.append(
            f"Left out: {c.outside} baseline records of other tasks or seeds"
            + (f", {c.replaced} of `{c.name}` itself (trained again here)" if c.replaced else "")
            + "."
        )
    lines += ["", to_markdown(tables)]
    last = f"All tables and plots of the merged records: `leaderboard/{study['markdown'].name}`"
    if study["report"] is not None:
        last += f"; the HTML report: `leaderboard/{study['report'].name}`"
    return "\n".join([*lines, last + "."]) + "\n"
