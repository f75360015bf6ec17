"""Plots of a context-extension run (``posenc extend``): per task, one panel per RoPE
rule with the metric against the evaluation length, zero-shot (solid) and after the
short fine-tune (dashed: with the factor covering each length; dash-dot: with the
fine-tune's factor at every length, judged past its factor beyond the fine-tuning
length), seeds as a band (min..max), the training-free baselines
(ALiBi, T5) in grey in every panel. Draws an ``ExtensionCurves`` (the numbers of one
task, filled by ``posenc.pipeline.extension``). matplotlib is imported lazily (Agg backend).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

from posenc.viz.study import METRIC_LABELS, numbers_digest, write_png


@dataclasses.dataclass(frozen=True)
class ExtensionCurves:
    """What one task's figure draws.

    ``series[(rule, stage)][seed][length]`` is the metric's value (stage ``zero-shot``,
    ``fine-tuned``, ``fine-tuned-covering`` or ``baseline``); ``rules`` are the RoPE rules with zero-shot records
    (one panel each, in order), ``baselines`` the encodings drawn in grey in every panel,
    ``finetune_length[rule]`` the length each rule was fine-tuned at, ``covered`` the
    rules with a covering-factor stage. Only the seeds that kept the task are in
    ``series``: a stage none of whose seeds kept it is not drawn."""

    task: str
    metric: str
    train_length: int
    seeds: int
    rules: list[str]
    baselines: list[str]
    finetune_length: dict[str, int]
    series: dict[tuple[str, str], dict[int, dict[int, float]]]
    covered: list[str] = dataclasses.field(default_factory=list)


def _line(ax, by_seed: dict[int, dict[int, float]], style: str, color, label: str) -> None:
    lengths = sorted({n for v in by_seed.values() for n in v})
    per_len = [[v[n] for v in by_seed.values() if n in v] for n in lengths]
    ax.plot(lengths, [statistics.fmean(v) for v in per_len], style, marker="o", ms=3, color=color, label=label)
    if len(by_seed) > 1:
        ax.fill_between(lengths, [min(v) for v in per_len], [max(v) for v in per_len], color=color, alpha=0.2)


def figure_task(curves: ExtensionCurves):
    """The matplotlib figure of one task: a panel per rule (caller closes it)."""
    # matplotlib is a heavy import: only when drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    task, metric, s, L = curves.task, curves.metric, curves.series, curves.train_length
    ft, rules, baselines = curves.finetune_length, curves.rules, curves.baselines
    if not rules:
        raise ValueError(f"no zero-shot records of task {task!r}")
    lengths = sorted({n for by_seed in s.values() for v in by_seed.values() for n in v} | {L, 2 * L})
    cols = min(3, len(rules))
    rows = math.ceil(len(rules) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols + 1.6, 3.0 * rows), sharex=True, sharey=True, squeeze=False
    )
    cmap = plt.get_cmap("tab10")
    for i, ax in enumerate(axes.flat):
        if i >= len(rules):
            ax.set_visible(False)
            continue
        rule = rules[i]
        for j, b in enumerate(baselines):
            _line(ax, s[(b, "baseline")], ":", str(0.35 + 0.25 * j), b)
        if (rule, "zero-shot") in s:
            _line(ax, s[(rule, "zero-shot")], "-", cmap(0), "zero-shot")
        else:
            ax.text(0.5, 0.5, "base runs did not\nkeep the task", transform=ax.transAxes, ha="center", fontsize=8)
        if (rule, "fine-tuned-covering") in s:
            _line(ax, s[(rule, "fine-tuned-covering")], "--", cmap(1), "fine-tuned, factor covers E")
        if (rule, "fine-tuned") in s and rule in curves.covered:
            _line(ax, s[(rule, "fine-tuned")], "-.", cmap(2), "fine-tuned, fine-tune's factor")
        elif (rule, "fine-tuned") in s:  # a rule without a factor (none): nothing to cover
            _line(ax, s[(rule, "fine-tuned")], "--", cmap(1), "fine-tuned, factor covers E")
        if rule in ft:
            ax.axvline(ft[rule], color=cmap(1), lw=0.8, ls=":")
            if (rule, "fine-tuned") not in s and (rule, "fine-tuned-covering") not in s:
                ax.text(0.5, 0.6, "fine-tunes did not\nkeep the task", transform=ax.transAxes, ha="center", fontsize=8)
        ax.axvline(L, color="grey", lw=1, ls=":")
        ax.set_title(rule, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlim(L / 1.2, max(lengths) * 1.2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if metric.startswith("ppl"):
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("evaluation length")
    for ax in axes[:, 0]:
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=8)
    seeds = curves.seeds
    fig.suptitle(
        f"{task}: RoPE trained at L={L}, extended by each rule ({seeds} seed{'s' if seeds > 1 else ''}; "
        "factor covering the length E; seeds that kept the task)",
        fontsize=10,
    )
    legend = {}
    for ax in axes.flat:  # every label once, the first panel's order first
        for h, lb in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lb, h)
    fig.legend(
        list(legend.values()),
        list(legend),
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(0.83, 0.9),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 0.83, 0.95))
    return fig


def curves_digest(curves: ExtensionCurves) -> str:
    """``numbers_digest`` of the numbers a figure draws (``plot_task`` stores it in the
    PNG's ``Description`` text chunk)."""
    payload = dataclasses.asdict(curves)
    payload["series"] = sorted(
        [list(key), sorted([seed, sorted(v.items())] for seed, v in by_seed.items())]
        for key, by_seed in curves.series.items()
    )
    payload["finetune_length"] = sorted(curves.finetune_length.items())
    payload["covered"] = sorted(curves.covered)
    return numbers_digest(payload)


def plot_task(curves: ExtensionCurves, path: str | Path) -> Path:
    """One PNG of one task: a panel per rule, ``curves_digest`` in its ``Description``
    text chunk. Returns the path written."""
    return write_png(figure_task(curves), path, f"posenc-extension {curves_digest(curves)}")
