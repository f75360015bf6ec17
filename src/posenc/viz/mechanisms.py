"""The mechanism probes' figure (``posenc.experiments.diagnose``): per task, every
encoding side by side.

Left, a heat map: one row per encoding, one column per intervention at each test length
``E > L``, each cell the share of the drop from ``L`` to ``E`` that the intervention
recovers, ``(s_c - s_E) / (s_L - s_E)`` (mean over the seeds with a drop; grey: no
seed with a drop). Right, the attention entropy (nats, mean over layers, heads and
seeds) of the scored queries at ``L`` and at each ``E``, coloured by its ratio to the
entropy of uniform attention at that length (1: uniform, diluted attention).

Draws a ``MechanismFigure`` (the numbers of one task, filled by
``posenc.pipeline.mechanisms_page``). matplotlib is imported lazily (Agg backend).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from posenc.viz.study import numbers_digest, write_png

#: Recoveries are coloured on this range (values outside it take its end colours; the
#: cells print the value itself).
COLOUR_RANGE = (-1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class MechanismFigure:
    """What one task's figure draws.

    ``recovery[encoding][E]``: each intervention's mean recovery (keys ``interventions``)
    over the seeds with a drop at ``E``, ``None`` when no seed has one; an ``E`` missing
    from it was not scored. ``drops[encoding][E]``: ``"k/n"``, the seeds with a drop of
    those scored. ``entropy[encoding][n]``: the mean attention entropy (nats) at
    length ``n`` (``L`` and each ``E``); ``uniform[n]``: the entropy of uniform attention.
    ``score``: what the recovery is computed on (exact match, log perplexity)."""

    task: str
    score: str
    train_length: int
    window: int
    encodings: list[str]
    lengths: list[int]
    interventions: list[str]
    labels: list[str]
    recovery: dict[str, dict[int, dict[str, float] | None]]
    drops: dict[str, dict[int, str]]
    entropy: dict[str, dict[int, float]]
    uniform: dict[int, float]


def recovery_matrix(data: MechanismFigure) -> list[list[float]]:
    """The heat map's values ``[encoding][E * intervention]`` (``E`` major, interventions
    in order); ``nan`` where no seed has a drop or the length was not scored."""
    rows = []
    for enc in data.encodings:
        row = []
        for e in data.lengths:
            rec = data.recovery.get(enc, {}).get(e)
            row += [math.nan if rec is None else rec[c] for c in data.interventions]
        rows.append(row)
    return rows


def entropy_matrix(data: MechanismFigure) -> tuple[list[int], list[list[float]]]:
    """``(lengths, [encoding][length])``: the entropy panel's lengths (``L``, then each
    ``E``) and values; ``nan`` where a length was not measured."""
    lengths = sorted(data.uniform)
    return lengths, [[data.entropy.get(enc, {}).get(n, math.nan) for n in lengths] for enc in data.encodings]


def _annotate(ax, values: list[list[float]], texts: list[list[str]], dark) -> None:
    """Print ``texts`` on the cells, white on the cells where ``dark(value)``."""
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            colour = "white" if not math.isnan(v) and dark(v) else "black"
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=6.5, color=colour)


def recovery_texts(data: MechanismFigure) -> list[list[str]]:
    """The heat map's cell texts: the value, ``no drop`` (no seed with a drop) or ``-``
    (not scored), in ``recovery_matrix``'s order."""
    rows = []
    for enc in data.encodings:
        row = []
        for e in data.lengths:
            by_e = data.recovery.get(enc, {})
            for c in data.interventions:
                row.append("-" if e not in by_e else "no drop" if by_e[e] is None else f"{by_e[e][c]:.2f}")
        rows.append(row)
    return rows


def figure_mechanisms(data: MechanismFigure):
    """The matplotlib figure of one task (caller closes it)."""
    # matplotlib is a heavy import: only when drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not data.encodings or not data.lengths:
        raise ValueError(f"no encoding with probes past L on task {data.task!r}: nothing to draw")
    L, k = data.train_length, len(data.interventions)
    matrix = recovery_matrix(data)
    lengths, entropy = entropy_matrix(data)
    rows, cols = len(data.encodings), len(matrix[0])
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(0.62 * cols + 0.62 * len(lengths) + 3.2, 0.3 * rows + 2.4),
        gridspec_kw={"width_ratios": [cols, len(lengths) + 0.5]},
        squeeze=True,
    )
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.85")
    left.imshow(matrix, cmap=cmap, vmin=COLOUR_RANGE[0], vmax=COLOUR_RANGE[1], aspect="auto")
    _annotate(left, matrix, recovery_texts(data), lambda v: abs(v) > 0.6)
    seeds = {
        enc: max((int(d.split("/")[1]) for d in data.drops.get(enc, {}).values()), default=0) for enc in data.encodings
    }
    left.set_yticks(
        range(rows), [f"{enc} ({seeds[enc]} seed{'s' * (seeds[enc] != 1)})" for enc in data.encodings], fontsize=7
    )
    left.set_xticks(range(cols), data.labels * len(data.lengths), rotation=90, fontsize=7)
    for g in range(1, len(data.lengths)):
        left.axvline(g * k - 0.5, color="black", lw=1.2)
    top = left.secondary_xaxis("top")
    top.set_xticks(
        [g * k + (k - 1) / 2 for g in range(len(data.lengths))], [f"E = {e} ({e // L}L)" for e in data.lengths]
    )
    top.tick_params(labelsize=8, length=0)
    left.set_title(
        f"share of the drop from L to E recovered, (s_c - s_E) / (s_L - s_E) on {data.score}; "
        "shifted: 1 - value is the share unseen positions alone reproduce",
        fontsize=8,
        pad=18,
    )
    greys = plt.get_cmap("viridis").with_extremes(bad="0.85")
    ratio = [
        [
            v / data.uniform[n] if data.uniform[n] > 0 and not math.isnan(v) else math.nan
            for v, n in zip(row, lengths, strict=True)
        ]
        for row in entropy
    ]
    right.imshow(ratio, cmap=greys, vmin=0.0, vmax=1.0, aspect="auto")
    texts = [["-" if math.isnan(v) else f"{v:.2f}" for v in row] for row in entropy]
    _annotate(right, ratio, texts, lambda v: v < 0.5)
    right.set_yticks(range(rows), [""] * rows)
    names = ["L" if n == L else f"{n // L}L" for n in lengths]
    right.set_xticks(
        range(len(lengths)),
        [f"{x}\nuniform {data.uniform[n]:.2f}" for x, n in zip(names, lengths, strict=True)],
        fontsize=7,
    )
    right.set_title("attention entropy (nats);\ncolour: entropy / uniform", fontsize=8)
    fig.suptitle(
        f"{data.task}: trained at L = {L}, window W = {data.window}; mean over the seeds with a drop", fontsize=10
    )
    fig.tight_layout()
    return fig


def mechanisms_digest(data: MechanismFigure) -> str:
    """``numbers_digest`` of the numbers a figure draws (``plot_mechanisms`` stores it in
    the PNG's ``Description`` text chunk)."""
    return numbers_digest(dataclasses.asdict(data))


def plot_mechanisms(data: MechanismFigure, path: str | Path) -> Path:
    """One PNG of one task, ``mechanisms_digest`` in its ``Description`` text chunk.
    Returns the path written."""
    return write_png(figure_mechanisms(data), path, f"posenc-mechanisms {mechanisms_digest(data)}")
