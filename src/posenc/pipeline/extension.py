"""A context-extension run's outputs (``posenc extend``): ``extension.json``, the tables
and ordering checks (``extension.md``), one plot per task, and the HTML report's section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posenc.experiments.extend_claims import ordering_tables
from posenc.experiments.extend_summary import (
    extension_tables,
    past_factor_tables,
    primary_metric,
    read_extension,
    series,
    task_names,
    validate_extension,
)
from posenc.experiments.results import atomic_write_bytes
from posenc.experiments.summary import TableData, to_markdown
from posenc.viz.extension import ExtensionCurves, figure_task, plot_task
from posenc.viz.study import safe_filename


def curves(data: dict[str, Any], task: str, metric: str | None = None) -> ExtensionCurves:
    """What the figure of ``task`` draws, from an ``extension.json`` dict (``metric``:
    default the task's primary metric, perplexity or exact match; the seeds that kept the
    task only, ``extend_summary.series``)."""
    recs = [r for r in data["records"] if r["task"] == task]
    if not recs:
        raise ValueError(f"no records of task {task!r}")
    metric = metric or primary_metric(data, task)
    s = series(data, task, metric)
    return ExtensionCurves(
        task=task,
        metric=metric,
        train_length=recs[0]["train_length"],
        seeds=len({r["seed"] for r in recs}),
        rules=[r for r in data["rules"] if any(x["rule"] == r and x["stage"] == "zero-shot" for x in recs)],
        baselines=[b for b in data["baselines"] if (b, "baseline") in s],
        finetune_length={r["rule"]: r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"},
        series=dict(s),
        covered=sorted({r["rule"] for r in recs if r["stage"] == "fine-tuned-covering"}),
    )


def all_tables(data: dict[str, Any]) -> list[TableData]:
    """Every table of an ``extension.json`` dict, in the order ``extension.md`` shows them:
    the metrics, the fine-tuned models past their fine-tuning length, the orderings."""
    return extension_tables(data) + past_factor_tables(data) + ordering_tables(data)


def plot_extension(data: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``extension_<task>.png`` for every task of an ``extension.json`` dict."""
    out_dir = Path(out_dir)
    return [plot_task(curves(data, t), out_dir / f"extension_{safe_filename(t)}.png") for t in task_names(data)]


def write_extension_outputs(data: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """``extension.json``, ``extension.md`` (tables + ordering checks) and one plot per task."""
    validate_extension(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "extension.json"
    atomic_write_bytes(json_path, (json.dumps(data, indent=1) + "\n").encode())
    plots = plot_extension(data, out_dir / "plots")
    md = ["# Context extension", ""]
    if data["command"]:
        md += ["Command:", "", "```", data["command"], "```", ""]
    if data["baselines_missing"]:
        md += [f"Baselines not registered in this installation (left out): {', '.join(data['baselines_missing'])}", ""]
    md += [to_markdown(all_tables(data))]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    md_path = out_dir / "extension.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"json": json_path, "markdown": md_path, "plots": plots}


def extension_report_section(extension: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A section for ``posenc.pipeline.report.write_report(..., extra_sections=[...])``
    from an ``extension.json`` path (or its dict): the tables, the ordering checks and
    one figure per task, in the report's ``{"title", "text", "tables", "figures"}`` form.

    Example:
        >>> write_report("runs/extend/report.html",
        ...              extra_sections=[extension_report_section("runs/extend/extension.json")])
    """
    data = validate_extension(extension) if isinstance(extension, dict) else read_extension(extension)
    tables = [{"caption": t.title, "columns": t.columns, "rows": t.rows} for t in all_tables(data)]
    ft = data["finetune"]
    text = (
        f"RoPE models trained at L, scored at {', '.join(f'{f}L' for f in data['factors'])} with each scaling "
        f"rule zero-shot (the factor covering the length) and after {ft['steps']} fine-tuning steps at "
        f"{ft['factor']}L with factor {ft['factor']} (scored with the factor covering each length, and with "
        f"factor {ft['factor']} judged past its factor) "
        if ft
        else "RoPE models trained at L, scored zero-shot with each scaling rule "
    )
    text += f"({len({r['seed'] for r in data['records']})} seeds). Command: {data['command'] or 'posenc extend'}"
    if data["baselines_missing"]:
        text += f". Baselines not registered when run: {', '.join(data['baselines_missing'])}"
    figures = [(f"{t}: each rule against evaluation length", figure_task(curves(data, t))) for t in task_names(data)]
    return {"title": "Context extension (RoPE scaling rules)", "text": text, "tables": tables, "figures": figures}
