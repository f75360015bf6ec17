"""Plots of a context-extension run (``posenc extend``): per task, one panel per RoPE
rule with the metric against the evaluation length, zero-shot (solid) and after the
short fine-tune (dashed), seeds as a band (min..max), the training-free baselines
(ALiBi, T5) in grey in every panel. matplotlib is imported lazily (Agg backend).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from posenc.experiments.extend_summary import primary_metric, series
from posenc.viz.study import _LABELS, _safe


def _line(ax, by_seed: dict[int, dict[int, float]], style: str, color, label: str) -> None:
    lengths = sorted({n for v in by_seed.values() for n in v})
    per_len = [[v[n] for v in by_seed.values() if n in v] for n in lengths]
    ax.plot(lengths, [statistics.fmean(v) for v in per_len], style, marker="o", ms=3, color=color, label=label)
    if len(by_seed) > 1:
        ax.fill_between(lengths, [min(v) for v in per_len], [max(v) for v in per_len], color=color, alpha=0.2)


def figure_task(data: dict[str, Any], task: str, metric: str | None = None):
    """The matplotlib figure of ``task``: a panel per rule (caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric = metric or primary_metric(data, task)
    s = series(data, task, metric)
    recs = [r for r in data["records"] if r["task"] == task]
    if not recs:
        raise ValueError(f"no records of task {task!r}")
    L = recs[0]["train_length"]
    ft = {r["rule"]: r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"}
    rules = [r for r in data["rules"] if (r, "zero-shot") in s]
    baselines = [b for b in data["baselines"] if (b, "baseline") in s]
    cols = min(3, len(rules))
    rows = math.ceil(len(rules) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.6, 3.0 * rows), sharex=True, sharey=True,
                             squeeze=False)  # fmt: skip
    cmap = plt.get_cmap("tab10")
    for i, ax in enumerate(axes.flat):
        if i >= len(rules):
            ax.set_visible(False)
            continue
        rule = rules[i]
        for j, b in enumerate(baselines):
            _line(ax, s[(b, "baseline")], ":", str(0.35 + 0.25 * j), b)
        _line(ax, s[(rule, "zero-shot")], "-", cmap(0), "zero-shot")
        if (rule, "fine-tuned") in s:
            _line(ax, s[(rule, "fine-tuned")], "--", cmap(1), f"fine-tuned at {ft[rule]}")
            ax.axvline(ft[rule], color=cmap(1), lw=0.8, ls=":")
        ax.axvline(L, color="grey", lw=1, ls=":")
        ax.set_title(rule, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if metric.startswith("ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("evaluation length")
    for ax in axes[:, 0]:
        ax.set_ylabel(_LABELS.get(metric, metric), fontsize=8)
    seeds = len({r["seed"] for r in recs})
    fig.suptitle(f"{task}: RoPE trained at L={L}, extended by each rule ({seeds} seed{'s' if seeds > 1 else ''}; "
                 "zero-shot factor = length/L)", fontsize=10)  # fmt: skip
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, [lb if not lb.startswith("fine-tuned") else "fine-tuned" for lb in labels], fontsize=8,
               loc="upper left", bbox_to_anchor=(0.87, 0.9), frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 0.87, 0.95))
    return fig


def plot_task(data: dict[str, Any], task: str, path: str | Path, metric: str | None = None) -> Path:
    """One PNG for ``task``: a panel per rule. Returns the path written."""
    import matplotlib.pyplot as plt

    fig = figure_task(data, task, metric)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_extension(data: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``extension_<task>.png`` for every task of an ``extension.json`` dict."""
    out_dir = Path(out_dir)
    tasks = list(dict.fromkeys(r["task"] for r in data["records"]))
    return [plot_task(data, t, out_dir / f"extension_{_safe(t)}.png") for t in tasks]


def report_section(extension: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A section for ``posenc.viz.report.write_report(..., extra_sections=[...])`` from an
    ``extension.json`` path (or its dict): the tables, the ordering checks and one
    figure per task, in the report's ``{"title", "text", "tables", "figures"}`` form.

    Example:
        >>> write_report("runs/extend/report.html",
        ...              extra_sections=[report_section("runs/extend/extension.json")])
    """
    import json

    from posenc.experiments.extend_summary import extension_tables, ordering_tables, validate_extension

    if isinstance(extension, dict):
        data = extension
    else:
        p = Path(extension)
        if not p.is_file():
            raise ValueError(f"extension file {str(p)!r} does not exist (run `posenc extend` first)")
        data = json.loads(p.read_text(encoding="utf-8"))
    validate_extension(data)
    tasks = list(dict.fromkeys(r["task"] for r in data["records"]))
    tables = [{"caption": t.title, "columns": t.columns, "rows": t.rows}
              for t in extension_tables(data) + ordering_tables(data)]  # fmt: skip
    ft = data["finetune"]
    text = (f"RoPE models trained at L, scored at {', '.join(f'{f}L' for f in data['factors'])} with each scaling "
            f"rule zero-shot (factor = length / L) and after {ft['steps']} fine-tuning steps at {ft['factor']}L "
            if ft else "RoPE models trained at L, scored zero-shot with each scaling rule ")  # fmt: skip
    text += f"({len({r['seed'] for r in data['records']})} seeds). Command: {data['command'] or 'posenc extend'}"
    if data["baselines_missing"]:
        text += f". Baselines not registered when run: {', '.join(data['baselines_missing'])}"
    figures = [(f"{t}: each rule against evaluation length", figure_task(data, t)) for t in tasks]
    return {"title": "Context extension (RoPE scaling rules)", "text": text, "tables": tables, "figures": figures}
