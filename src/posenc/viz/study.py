"""Plots of train-short/test-long studies: a metric against the evaluation length, one
line per encoding (mean over seeds), seeds as a band (min..max), the training length
marked. Draws the records it is given (plain dicts, schema in
``posenc.experiments.results``), grouped by the caller. matplotlib is imported lazily
(Agg backend), only here.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

#: Axis labels of the study's metrics.
METRIC_LABELS = {
    "exact_match": "exact match (answer tokens)",
    "token_accuracy": "per-token accuracy (answer tokens)",
    "ppl": "perplexity (non-overlapping)",
    "ppl_sliding": "perplexity (sliding window)",
}


def safe_filename(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``-``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def numbers_digest(payload: Any) -> str:
    """SHA-256 of ``payload`` as sorted-key JSON: the digest of the numbers a figure
    draws, which the figure writers store in the PNG's ``Description`` text chunk so a
    test can tell which records drew a committed figure."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def task_digest(by_enc: dict[str, list[dict[str, Any]]], metric: str) -> str:
    """``numbers_digest`` of what ``plot_task`` draws: ``(length, metric)`` of every run
    of every encoding."""
    drawn = {enc: [[[m["length"], m[metric]] for m in r["metrics"]] for r in recs] for enc, recs in by_enc.items()}
    return numbers_digest([metric, drawn])


def plot_task(
    task: str,
    by_enc: dict[str, list[dict[str, Any]]],
    metric: str,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """One figure: ``metric`` against length for every encoding of one task, ``by_enc``
    ``{encoding: [records over seeds]}`` (lines in that order); ``task_digest`` in the
    PNG's ``Description``.

    Returns the path written (PNG).
    """
    # matplotlib is a heavy import: only when drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not by_enc:
        raise ValueError(f"no records of task {task!r} to plot")
    L = next(iter(by_enc.values()))[0]["train_length"]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    cmap = plt.get_cmap("tab20")
    bases = list(dict.fromkeys(enc.partition("+")[0] for enc in by_enc))  # NAME+randpos: NAME's colour, dashed
    for enc, recs in by_enc.items():
        color = cmap(bases.index(enc.partition("+")[0]) % 20)
        lengths = sorted({m["length"] for r in recs for m in r["metrics"]})
        per_len = [[{m["length"]: m[metric] for m in r["metrics"]}[n] for r in recs] for n in lengths]
        mean = [statistics.fmean(v) for v in per_len]
        style = "--" if "+randpos" in enc else "-"
        ax.plot(lengths, mean, style, marker="o", ms=3, color=color, label=enc)
        if len(recs) > 1:
            ax.fill_between(
                lengths,
                [min(v) for v in per_len],
                [max(v) for v in per_len],
                color=color,
                alpha=0.2 if len(by_enc) <= 10 else 0.08,
            )
    ax.axvline(L, color="grey", lw=1, ls=":")
    ax.text(L, 1.0, " trained up to L", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if metric.startswith("ppl"):
        ax.set_yscale("log")
    ax.set_xlabel("evaluation length")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    counts = sorted({len(v) for v in by_enc.values()})
    seeds = f"{counts[0]}–{counts[-1]} seeds" if len(counts) > 1 else f"{counts[0]} seed{'s' if counts[0] > 1 else ''}"
    ax.set_title(title or f"{task}: {METRIC_LABELS.get(metric, metric)} (L={L}, {seeds})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return write_png(fig, path, f"posenc-study {task_digest(by_enc, metric)}")


def write_png(fig: Any, path: str | Path, description: str | None = None) -> Path:
    """Write the matplotlib ``fig`` to the PNG ``path`` (folders made; 110 dpi), with
    ``description`` in its ``Description`` text chunk (a digest the doc tests compare),
    close it and return the path: the one way the study, extension and mechanism
    figures are written."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Description": description} if description is not None else None)
    plt.close(fig)
    return path
