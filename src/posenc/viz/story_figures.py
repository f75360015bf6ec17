"""The report's story figures that ``posenc.viz.figures`` has no kind for: the sentence
permutation test of whole models and an encoding's signal past the trained length.
matplotlib is imported lazily (through ``figures._figure``-like construction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posenc import analysis
from posenc.analysis.order import SentenceOrder
from posenc.analysis.pretrained import PretrainedPositions
from posenc.viz.figures import FigureUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _figure(w: float, h: float) -> Figure:
    from matplotlib.figure import Figure  # matplotlib is a heavy import: only when drawing

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def sentence_order(tests: list[SentenceOrder]) -> Figure:
    """One panel per model: the output vector of each word in the sentence and in its
    reordering, the two rows of a word side by side (equal rows: the model is blind)."""
    if not tests:
        raise FigureUnavailable("no sentence test given")
    fig = _figure(4.2 * len(tests) + 0.6, 3.4)
    axes = fig.subplots(1, len(tests), squeeze=False)[0]
    lim = max(float(t.outputs.abs().max()) for t in tests) or 1.0
    for ax, t in zip(axes, tests, strict=True):
        rows, labels = [], []
        where = {w: i for i, w in enumerate(t.order)}  # word index -> its position in the reordering
        for i, w in enumerate(t.words):
            rows += [t.outputs[i], t.permuted[where[i]]]
            labels += [f"{w}  in “{t.sentence}”", f"{w}  in “{t.permuted_sentence}”"]
        im = ax.imshow(
            torch.stack(rows).numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest"
        )
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for y in range(1, len(labels) - 1, 2):
            ax.axhline(y + 0.5, color="black", lw=1.5)
        ax.set_xlabel("output dimension")
        verdict = "same outputs" if t.same else "outputs differ"
        mask = "causal mask" if t.causal else "no mask"
        ax.set_title(f"{t.encoding}, {mask}: {verdict}\n(deviation {t.deviation:.2g})", fontsize=10)
    fig.colorbar(im, ax=list(axes), label="final hidden state")
    fig.suptitle("The same words in another order through a 2-layer posenc.Transformer")
    return fig


def past_length(name: str, *, train_length: int = 250, horizon: int = 384, dim: int = 32) -> Figure:
    """Left: the position signal of ``name`` over ``0..horizon`` with the trained length
    marked. Right: how far each position past it is from the nearest trained one, in
    median steps between neighbouring trained positions (``analysis.beyond``)."""
    probe = analysis.build(name, dim=dim, num_heads=2, max_len=horizon)
    if probe.kind == "none":
        raise FigureUnavailable(f"{name!r} carries no position signal")
    sig = analysis.signature(probe, horizon).numpy()  # [horizon, F]
    past = analysis.beyond(probe, train_length, horizon)
    if past.unseen_distance is None:
        raise FigureUnavailable(f"{name!r} refuses positions past {train_length}: {past.error}")
    fig = _figure(12.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.6, 1])
    lim = float(abs(sig).max()) or 1.0
    im = ax1.imshow(sig.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax1.axvline(train_length - 0.5, color="black", ls="--", lw=1.5)
    ax1.text(
        train_length - 2,
        sig.shape[1] - 1,
        f"trained 0..{train_length - 1} ",
        fontsize=8,
        ha="right",
        va="top",
        bbox={"facecolor": "white", "alpha": 0.85, "lw": 0},
    )
    fig.colorbar(im, ax=ax1, label="value")
    ax1.set_xlabel("position")
    ax1.set_ylabel("dimension")
    ax1.set_title(f"{name}: PE(position), dim {dim}")
    xs = torch.arange(train_length, horizon).numpy()
    ax2.plot(xs, past.unseen_distance.numpy(), color="tab:red")
    ax2.axhline(1.0, color="0.5", ls=":", lw=1, label="one step between neighbours")
    ax2.set_xlabel("position p ≥ trained length")
    ax2.set_ylabel("distance to nearest trained PE (median steps)")
    first = float(past.unseen_distance[0])
    ax2.set_title(f"position {train_length}: {first:.2g}× the median step away", fontsize=10)
    ax2.legend(fontsize=8)
    return fig


def pretrained(info: PretrainedPositions, *, name: str | None = None, horizon: int | None = None) -> Figure:
    """A pretrained model's learned position table (a ``PretrainedPositions`` from
    ``posenc.analysis.pretrained.load_positions``): norms against the mean token norm,
    and the position × position cosine similarity."""
    if info.kind != "learned" or info.table is None:
        raise FigureUnavailable(f"{info.model_dir} uses {info.kind!r} positions, not a learned table")
    label = name or str(info.model_dir.name)
    table = info.table.double()[: horizon or None]  # [s, dim]
    norms = table.norm(dim=-1)
    unit = table / norms[:, None].clamp_min(1e-12)
    fig = _figure(13.0, 4.8)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.3, 1])
    ax1.plot(norms.numpy(), label="‖PE(pos)‖")
    if info.token_norm is not None:
        ax1.axhline(info.token_norm, color="black", ls="--", lw=1, label=f"mean token norm {info.token_norm:.3g}")
    ax1.set_xlabel("position")
    ax1.set_ylabel("norm")
    ax1.set_yscale("log")
    ax1.set_title(f"norms of the {table.shape[0]} learned position vectors (dim {table.shape[1]})")
    ax1.legend()
    im = ax2.imshow((unit @ unit.T).numpy(), origin="lower", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax2, label="cosine similarity")
    ax2.set_xlabel("position n")
    ax2.set_ylabel("position m")
    ax2.set_title("cos(PE(m), PE(n))")
    fig.suptitle(f"{label}: learned absolute position embeddings ({info.tensor_name})")
    return fig
