"""A study's outputs from its records: markdown tables (``results.md``, with the
learning-rate sweep's table and the published-findings comparisons), one plot per task
and metric (``plots/*.png``) and, when ``posenc.viz.report`` exists, the HTML report
(``report.html``). Tables, plots and comparisons show ``summary.selected(records)``: after
a learning-rate sweep, only the chosen rate's runs of each task and encoding."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from posenc.experiments.intervals import interval_tables, without_counts
from posenc.experiments.parallel import plan_jobs
from posenc.experiments.published import published_tables
from posenc.experiments.results import read_results
from posenc.experiments.study import StudyPlan, plan_phases
from posenc.experiments.summary import (
    group,
    is_lm,
    not_learned,
    not_learned_note,
    selected,
    sweep_table,
    tables,
    to_markdown,
)
from posenc.pipeline.report import write_report
from posenc.viz.study import plot_task, safe_filename


def report_available() -> bool:
    """True when ``posenc.viz.report`` (the HTML report) is installed."""
    return importlib.util.find_spec("posenc.viz.report") is not None


def prepare_study(
    preset: str,
    request: dict[str, Any],
    run_dir: str | Path,
    *,
    threads: int | None = None,
    jobs: int | None = None,
    launched: bool = False,
) -> tuple[StudyPlan, int, str | None]:
    """``(plan, jobs, note)`` of ``posenc study``: ``plan_phases(preset, **request)``
    with the threads per run that ``plan_jobs`` gives for the runs still to train in
    ``run_dir`` (``note``: its warning, or ``None``)."""
    plan = plan_phases(preset, **request, threads=threads)
    pending = plan.pending(read_results(run_dir))
    jobs, run_threads, note = plan_jobs(jobs, threads, pending, launched=launched)
    if run_threads != threads:
        plan = plan_phases(preset, **request, threads=run_threads)
    return plan, jobs, note


def plot_study(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Every plot of a study into ``out_dir``: exact match and token accuracy per
    synthetic task, both perplexities per corpus (``selected(records)``). Returns the
    paths written."""
    out_dir = Path(out_dir)
    paths = []
    for task, by_enc in group(selected(records)).items():
        metrics = ("ppl", "ppl_sliding") if is_lm(next(iter(by_enc.values()))) else ("exact_match", "token_accuracy")
        for metric in metrics:
            paths.append(plot_task(task, by_enc, metric, out_dir / f"{safe_filename(task)}_{metric}.png"))
    return paths


def write_study_outputs(
    run_dir: str | Path, records: list[dict[str, Any]] | None = None, *, report: bool = True
) -> dict[str, Any]:
    """Markdown tables (``results.md``, with the 95% intervals of ``interval_tables``),
    plots (``plots/*.png``) and, when ``posenc.viz.report`` exists, ``report.html``.
    Returns the paths written. ``ValueError`` when the run folder has no results."""
    run_dir = Path(run_dir)
    records = read_results(run_dir) if records is None else records
    if not records:
        raise ValueError(f"no results in {str(run_dir)!r} to summarize")
    plots = plot_study(records, run_dir / "plots")
    shown = len(selected(records))
    md = ["# Study results", "", f"Run folder: `{run_dir}`; {len(records)} runs.", ""]
    sweep = sweep_table(records)
    if sweep is not None:
        md += [
            "## Learning-rate sweep",
            "",
            f"Every table below shows {shown} of the {len(records)} runs: for each task and encoding only the "
            "runs at the learning rate chosen on its sweep seed by the in-distribution validation score (never "
            f"the test lengths); the sweep's other {len(records) - shown} runs appear only here.",
            "",
            to_markdown([sweep]),
        ]
    unlearned = not_learned(records)
    if unlearned:
        md += [f"**Warning:** {not_learned_note(unlearned)}", ""]
    if any("metrics_random" in r for r in records):
        md += [
            "Runs with randomized positions (`+randpos`) are scored, gated and ranked at randomized test positions, "
            "as Ruoss et al. 2023 evaluate them; their scores at positions 0..s-1 are in the Ruoss table's column "
            "'(L, 2L] +randpos at 0..s-1' and in each record's `metrics`.",
            "",
        ]
    md.append(to_markdown(tables(records)))
    md += ["## Intervals", "", to_markdown(interval_tables(records))]
    if without_counts(records):
        md += [
            f"No intervals for {', '.join(without_counts(records))}: their records carry no hit counts or segment "
            "NLLs (written by an earlier posenc); the text comparisons with the papers leave them out too.",
            "",
        ]
    compared = published_tables(records)
    if compared:
        md += ["## Beside the published findings", "", to_markdown(compared)]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    (run_dir / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    out: dict[str, Any] = {"markdown": run_dir / "results.md", "plots": plots, "report": None}
    if report and report_available():
        write_report(run_dir / "report.html", study_dir=run_dir)
        out["report"] = run_dir / "report.html"
    return out
