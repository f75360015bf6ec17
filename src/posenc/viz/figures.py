"""Matplotlib figures of the measurements in ``posenc.analysis`` (PNG or SVG).

Every function returns a ``matplotlib.figure.Figure`` (no pyplot, no global state) with
labelled axes, a colorbar where colours carry numbers, and a title. Figures that need an
encoding which is not registered, or of another family, raise :class:`FigureUnavailable`
with the reason (``FIGURE_SIGNALS``: which figure applies to which position signal).
Figures of trained models draw what they are given (attention weights; a pretrained
table: ``posenc.viz.story_figures.pretrained``): ``posenc.pipeline.figures`` trains and loads.
matplotlib is imported lazily, inside the functions.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

import posenc
from posenc import analysis
from posenc.functional import rope_scaling
from posenc.functional.checks import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


class FigureUnavailable(ValueError):
    """A figure cannot be drawn here (encoding not registered, or of another family)."""


def _figure(w: float = 6.4, h: float = 4.8) -> Figure:
    from matplotlib.figure import Figure  # matplotlib is a heavy import: only when drawing

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


#: The position signals each figure applies to: a ``Probe.kind`` (``vector``, ``rotation``,
#: ``bias``, ``none``) or ``shared bias``, a bias whose values stop changing past some
#: distance (buckets, a clip; see ``signal_of``). Kinds not listed apply to every signal.
#: ``past`` and ``blindness`` are the report's story figures (``posenc.viz.story_figures``).
FIGURE_SIGNALS = {
    "heatmap": ("vector", "rotation", "bias", "shared bias"),
    "similarity": ("vector", "rotation"),
    "bias": ("bias", "shared bias"),
    "buckets": ("shared bias",),
    "rotation": ("rotation",),
    "wavelengths": ("rotation",),
    "decay": ("rotation",),
    "past": ("vector",),
    "blindness": ("none",),
}


def applies(kind: str, signal: str) -> bool:
    """Whether figure ``kind`` applies to an encoding whose position signal is ``signal``."""
    return signal in FIGURE_SIGNALS.get(kind, (signal,))


def kinds_for_signal(signal: str) -> list[str]:
    """The per-encoding figure kinds of ``posenc plot`` that apply to an encoding whose
    position signal is ``signal`` (see ``FIGURE_SIGNALS``)."""
    return [kind for kind in KINDS if applies(kind, signal)]


def signal_of(kind: str, saturation: int | None = None) -> str:
    """The figure signal: a ``Probe.kind``, or ``shared bias`` for a bias that saturates
    (``analysis.Beyond.saturation`` not None: buckets, a clip, CoPE's npos_max)."""
    return "shared bias" if kind == "bias" and saturation is not None else kind


def probe_signal(probe: analysis.Probe) -> str:
    """``signal_of`` a built encoding (its saturation measured over 256 distances)."""
    return signal_of(probe.kind, analysis.beyond(probe, 16, 256).saturation if probe.kind == "bias" else None)


def _probe(name: str, *, figure: str | None = None, **kw: Any) -> analysis.Probe:
    if name not in posenc.available():
        raise FigureUnavailable(f"encoding {name!r} is not registered; registered: {', '.join(posenc.available())}")
    probe = analysis.build(name, **kw)
    signals = FIGURE_SIGNALS.get(figure)
    signal = probe_signal(probe) if signals and "shared bias" in signals else probe.kind
    if signals is not None and signal not in signals:
        raise FigureUnavailable(
            f"the {figure} figure needs an encoding whose position signal is {' or '.join(signals)}; "
            f"{name!r} ({probe.family}) carries it as {signal!r}. "
            f"Kinds that apply to {name!r}: {', '.join(kinds_for_signal(signal)) or 'none of these'} "
            "(and the global kinds magnitude, distance, and attention)"
        )
    return probe


def save(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``fig`` as PNG or SVG (by the file suffix); returns the path."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"path must end in .png or .svg, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120 if path.suffix.lower() == ".png" else None)
    return path


_SIGNAL = {
    "vector": "PE(position)",
    "rotation": "R(position) q  (fixed q, all heads)",
    "bias": "bias(query = position, key = 0) per head",
    "none": "nothing (no position signal)",
}


# -- the absolute story -------------------------------------------------------------------------
def heatmap(name: str, *, horizon: int = 128, dim: int = 64, num_heads: int = 4, **params: Any) -> Figure:
    """Position × dimension heatmap of the position signal."""
    probe = _probe(name, figure="heatmap", dim=dim, num_heads=num_heads, max_len=max(horizon, 1), params=params or None)
    sig = analysis.signature(probe, horizon).numpy()  # [horizon, F]
    fig = _figure(7.0, 4.8)
    ax = fig.add_subplot()
    lim = float(abs(sig).max()) or 1.0
    cmap, vmin = ("RdBu_r", -lim) if sig.min() < 0 else ("viridis", 0.0)
    im = ax.imshow(sig.T, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="value")
    ax.set_xlabel("position")
    ax.set_ylabel("dimension" if probe.kind != "bias" else "head")
    ax.set_title(f"{name}: {_SIGNAL[probe.kind]}")
    return fig


def similarity(name: str, *, horizon: int = 128, dim: int = 64, num_heads: int = 4, **params: Any) -> Figure:
    """Position × position cosine similarity of the position signal."""
    probe = _probe(
        name, figure="similarity", dim=dim, num_heads=num_heads, max_len=max(horizon, 1), params=params or None
    )
    sig = analysis.signature(probe, horizon).double()
    unit = sig / sig.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (unit @ unit.T).numpy()  # [horizon, horizon]
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    im = ax.imshow(sim, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_xlabel("position n")
    ax.set_ylabel("position m")
    period = analysis.uniqueness(probe, horizon).period
    repeat = f"; repeats every {period} positions" if period else ""
    ax.set_title(f"{name}: cosine similarity of positions{repeat}")
    return fig


def magnitude(names: list[str] | None = None, *, horizon: int = 256, dim: int = 32, num_heads: int = 2) -> Figure:
    """‖PE(position)‖ / ‖typical token‖ for additive encodings (log scale)."""
    names = [n for n in (names or posenc.available()) if n in posenc.available()]
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    drawn = 0
    for n in names:
        probe = analysis.build(n, dim=dim, num_heads=num_heads, max_len=horizon)
        if probe.kind != "vector":
            continue
        m = analysis.magnitude(probe, horizon)
        ax.plot(m.ratio.clamp_min(1e-3).numpy(), label=n)
        drawn += 1
    if not drawn:
        raise FigureUnavailable(f"none of {names} is an additive encoding")
    ax.axhline(1.0, color="black", ls="--", lw=1, label="token norm")
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("‖PE(pos)‖ / ‖token embedding‖")
    ax.set_title(f"Magnitude of additive encodings (dim={dim}, unit-variance tokens)")
    ax.legend(fontsize=8)
    return fig


def distance(names: list[str] | None = None, *, max_distance: int = 256, dim: int = 32, num_heads: int = 2) -> Figure:
    """Dependence on distance. Left, additive encodings: the mean cosine similarity of
    PE(m) and PE(m + r) over m. Right, encodings acting on the scores (rotary, bias):
    the score of an all-ones query at distance r from an all-ones key, minus its value
    at r = 0 (RoFormer's decay picture; ALiBi's line; T5's steps)."""
    names = [n for n in (names or posenc.available()) if n in posenc.available()]
    fig = _figure(12.0, 4.6)
    ax1, ax2 = fig.subplots(1, 2)
    import matplotlib as mpl  # heavy: only when drawing (cycler comes with matplotlib)
    from cycler import cycler

    # 10 colours solid, then the same 10 dashed: 20 distinguishable lines per panel.
    style = cycler(linestyle=["-", "--"]) * cycler(color=[mpl.colormaps["tab10"](i) for i in range(10)])
    for ax in (ax1, ax2):
        ax.set_prop_cycle(style)
    left = right = 0
    for n in names:
        probe = analysis.build(n, dim=dim, num_heads=num_heads, max_len=2 * max_distance)
        if probe.kind == "vector":
            sig = analysis.signature(probe, 2 * max_distance).double()  # [2R, dim]
            unit = sig / sig.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = torch.stack(
                [(unit[:max_distance] * unit[r : r + max_distance]).sum(-1).mean() for r in range(max_distance)]
            )
            ax1.plot(cos.numpy(), label=n)
            left += 1
        elif probe.kind != "none":
            prof = analysis.distance_profile(probe, max_distance, draws=8)
            ax2.plot(prof.distances.numpy(), (prof.ones_score - prof.ones_score[0]).numpy(), label=n)
            right += 1
    for ax, count, what in ((ax1, left, "additive"), (ax2, right, "rotary or bias")):
        if count:
            ax.legend(fontsize=8, ncol=2)
        else:
            ax.text(0.5, 0.5, f"no {what} encoding registered", ha="center", va="center", transform=ax.transAxes)
    ax1.set_xlabel("distance r")
    ax1.set_ylabel("mean over m of cos(PE(m), PE(m + r))")
    ax1.set_title("additive: similarity of positions r apart")
    ax2.set_xlabel("distance r = m − n (query at m, key at 0)")
    ax2.set_ylabel("score(r) − score(0),  q = k = ones")
    ax2.set_title("rotary and bias: score against distance")
    fig.suptitle(f"Dependence on distance (dim={dim}, {num_heads} heads)")
    return fig


# -- relative and bias encodings ----------------------------------------------------------------
def bias_matrix(name: str, *, length: int = 64, num_heads: int = 4, dim: int = 64, causal: bool = False) -> Figure:
    """The bias matrices ``bias(m, n)`` of (up to four) heads of a bias encoding."""
    probe = _probe(name, figure="bias", dim=dim, num_heads=num_heads, causal=causal)
    bias = analysis.bias_matrix(probe, length).numpy()  # [h, s, s]
    heads = min(4, bias.shape[0])
    fig = _figure(3.4 * heads + 0.8, 3.6)
    axes = fig.subplots(1, heads, squeeze=False)[0]
    finite = bias[abs(bias) != float("inf")]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for hd, ax in enumerate(axes):
        im = ax.imshow(bias[hd], origin="upper", cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"head {hd}")
        ax.set_xlabel("key position n")
        ax.set_ylabel("query position m")
    fig.colorbar(im, ax=list(axes), label="bias added to the score")
    fig.suptitle(f"{name}: bias(m, n){' (causal)' if causal else ''}")
    return fig


def buckets(name: str = "t5", *, length: int = 256, num_heads: int = 4, dim: int = 64, causal: bool = False) -> Figure:
    """Which relative distances share a parameter: the bucket map of T5-style biases,
    recovered from ``bias()`` alone (distances whose bias agrees in every head)."""
    probe = _probe(name, figure="buckets", dim=dim, num_heads=num_heads, causal=causal)
    bias = analysis.bias_matrix(probe, length)  # [h, s, s]
    ids = bucket_ids(bias)  # [s, s], -1 where masked
    n_buckets = int(ids.max()) + 1
    fig = _figure(12.0, 4.6)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.5])
    masked = ids.double().masked_fill(ids < 0, float("nan")).numpy()
    im = ax1.imshow(masked, origin="upper", cmap="tab20b", interpolation="nearest")
    fig.colorbar(im, ax=ax1, label="bucket (shared parameter) id")
    ax1.set_xlabel("key position n")
    ax1.set_ylabel("query position m")
    ax1.set_title("bucket of each (m, n)")
    d = torch.arange(length)
    row_back, row_fwd = ids[length - 1, :].flip(0), ids[0, :]  # distance d back / forward
    ax2.step(d.numpy(), row_back.numpy(), where="post", label="key d positions before the query")
    if (row_fwd >= 0).all():
        ax2.step(d.numpy(), row_fwd.numpy(), where="post", label="key d positions after the query")
    md = next((v for k, v in probe.pe.params.asdict().items() if "max_distance" in k), None)
    if isinstance(md, int):
        ax2.axvline(md, color="black", ls="--", lw=1, label=f"max_distance = {md}")
    ax2.set_xscale("symlog", linthresh=8)
    ax2.set_xlim(0, length)
    ax2.set_xlabel("distance d = |m − n|")
    ax2.set_ylabel("bucket id")
    changes = (row_back != row_back[-1]).nonzero()
    last = int(changes.max()) + 1 if len(changes) else 0  # the bucket of every distance from here on
    ax2.set_title(f"bucket against distance: no new bucket past d = {last}")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{name}: {n_buckets} distinct biases for {length} positions{' (causal)' if causal else ''}")
    return fig


def bucket_ids(bias: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Bucket id of each (m, n) of a bias ``[h, s, s]``: entries whose bias agrees in
    every head (to ``rtol`` of the largest) share an id; ids are numbered in order of
    first appearance by relative distance ``n − m`` (most negative first); non-finite
    (masked) entries get -1. Returns ``[s, s]`` int64."""
    h, s, _ = bias.shape
    flat = rearrange(bias, "h s t -> (s t) h").double()  # [s*s, h]
    finite = torch.isfinite(flat).all(-1)  # [s*s]
    ids = torch.full((s * s,), -1, dtype=torch.long)
    if not finite.any():
        return ids.view(s, s)
    scale = max(float(flat[finite].abs().max()), 1e-12)
    keys = torch.round(flat[finite] / (rtol * scale)).long()  # [N, h]
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # lexicographic ids [N]
    rel = (torch.arange(s)[None, :] - torch.arange(s)[:, None]).flatten()[finite]  # n - m [N]
    # Order of appearance: by n - m, then by flat index (stable sort).
    rank = torch.empty_like(rel)
    rank[torch.argsort(rel, stable=True)] = torch.arange(len(rel))
    first = torch.full((int(inverse.max()) + 1,), len(rel), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, rank, reduce="amin")
    relabel = torch.empty_like(first)
    relabel[torch.argsort(first)] = torch.arange(len(first))
    ids[finite] = relabel[inverse]
    return ids.view(s, s)


# -- rotary -------------------------------------------------------------------------------------
def rotation(name: str = "rope", *, head_dim: int = 64, positions: int = 24) -> Figure:
    """RoPE rotation diagram: a 2-D plane of the query rotates by ``pos * theta_i``;
    the fastest, a middle and the slowest plane for positions ``0..positions-1``."""
    probe = _probe(name, figure="rotation", dim=head_dim, num_heads=1)
    pairs = [p for p in analysis.rotation_pairs(probe) if p[1] >= 0]
    if not pairs:
        raise FigureUnavailable(f"{name!r} rotates no plane")
    chosen = [pairs[0], pairs[len(pairs) // 2], pairs[-1]]
    # The all-ones query: every plane starts at (1, 1) / sqrt(d), on the same circle.
    q = torch.full((1, 1, positions, head_dim), 1.0 / math.sqrt(head_dim))  # [1, 1, s, d]
    pos = torch.arange(positions)
    q_rot = probe.pe.rotate(q, q, pos, pos)[0][0, 0]  # [s, d]
    fig = _figure(13.0, 4.6)
    axes = fig.subplots(1, 3)
    import matplotlib as mpl  # heavy: only when drawing

    norm = mpl.colors.Normalize(0, positions - 1)
    for ax, (i, j, ang, _) in zip(axes, chosen, strict=True):
        x, y = q_rot[:, i].numpy(), q_rot[:, j].numpy()
        radius = math.sqrt(2.0 / head_dim)
        t = torch.linspace(0, 2 * math.pi, 200)
        ax.plot((radius * t.cos()).numpy(), (radius * t.sin()).numpy(), color="0.85", lw=1, ls=":", zorder=0)
        ax.plot(x, y, color="0.7", lw=1, zorder=1)
        sc = ax.scatter(x, y, c=pos.numpy(), cmap="viridis", norm=norm, s=25, zorder=2)
        ax.annotate("pos 0", (x[0], y[0]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        r = max(radius, float(abs(x).max()), float(abs(y).max())) * 1.25
        ax.set_xlim(-r, r)
        ax.set_ylim(-r, r)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
        ax.set_xlabel(f"q[{i}]")
        ax.set_ylabel(f"q[{j}]")
        turns = positions * ang / (2 * math.pi)
        ax.set_title(f"plane ({i}, {j}): θ = {ang:.3g} rad/pos\n{turns:.3g} turns in {positions} positions")
    fig.colorbar(sc, ax=list(axes), label="position")
    fig.suptitle(f"{name}: the query rotates in each plane with its own frequency (head_dim={head_dim})")
    return fig


def wavelengths(name: str = "rope", *, head_dim: int = 64, context: int = 2048) -> Figure:
    """Wavelength ``2π / θ_i`` of each rotation plane against the trained context:
    planes above the line never complete a turn within the context."""
    probe = _probe(name, figure="wavelengths", dim=head_dim, num_heads=1)
    pairs = [p for p in analysis.rotation_pairs(probe) if p[1] >= 0 and p[2] > 0]
    if not pairs:
        raise FigureUnavailable(f"{name!r} rotates no plane")
    lam = [2 * math.pi / a for *_, a, _ in pairs]
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    colors = ["tab:blue" if w <= context else "tab:red" for w in lam]
    ax.scatter(range(len(lam)), lam, c=colors, s=18)
    ax.axhline(context, color="black", ls="--", lw=1, label=f"context = {context}")
    ax.set_yscale("log")
    ax.set_xlabel("rotation plane i (fastest first)")
    ax.set_ylabel("wavelength 2π/θ_i (positions)")
    ax.set_title(f"{name}: {sum(w > context for w in lam)} of {len(lam)} planes never complete a turn")
    ax.legend()
    return fig


#: The rules the scaling plot draws: the rope_types of the table that stretch a context
#: (``stretch``), with the parameters ``posenc extend`` uses; default is the reference line.
SCALING_RULES: tuple[str, ...] = tuple(
    name
    for name, rule in rope_scaling.SCALING_RULES.items()
    if rule.stretch is not None and rule.rope_type is None and name != "default"
)


def scaling(*, head_dim: int = 128, base: float = 10000.0, factor: float = 8.0, original: int = 4096) -> Figure:
    """Per-dimension frequency ratio ``inv_freq_scaled / inv_freq`` of each RoPE scaling
    rule (``posenc.rope_frequencies``) at ``factor`` times the original context."""
    freqs = posenc.rope_frequencies
    default, _ = freqs(head_dim, {"rope_type": "default", "rope_theta": base})
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot()
    wl = (2 * math.pi / default.double()).numpy()
    ax.plot(wl, [1.0] * len(wl), color="black", ls=":", label="default")
    for rule in SCALING_RULES:
        stretch = rope_scaling.SCALING_RULES[rule].stretch(float(factor), original, head_dim, float(base))
        params = {"rope_type": rule, "rope_theta": base, **stretch}
        # at factor x the original context (dynamic NTK's base grows with the current length)
        inv, att = freqs(head_dim, params, max_position_embeddings=original, seq_len=int(factor * original))
        ax.plot(wl, (inv.double() / default.double()).numpy(), marker=".", label=f"{rule} (attention ×{att:.3g})")
    ax.axvline(original, color="0.5", ls="--", lw=1, label=f"original context {original}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("original wavelength 2π/θ_i (positions)")
    ax.set_ylabel("θ_i scaled / θ_i")
    ax.set_title(f"RoPE scaling rules at factor {factor:g} (head_dim={head_dim}, base={base:g})")
    ax.legend(fontsize=8)
    return fig


def decay(name: str = "rope", *, head_dim: int = 64, max_distance: int = 512) -> Figure:
    """RoFormer's long-term-decay bound against the mean of random q·k (Barbero et al.)."""
    probe = _probe(name, figure="decay", dim=head_dim, num_heads=1)
    prof = analysis.distance_profile(probe, max_distance, draws=256)
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    d = prof.distances.numpy()
    if prof.bound is not None:
        ax.plot(d, prof.bound.numpy(), label="RoFormer bound (normalized)")
    base = float(prof.mean_abs_score[0]) or 1.0
    ax.plot(d, (prof.mean_abs_score / base).numpy(), label="mean |q·k|, random q, k (normalized)")
    ax.plot(d, (prof.mean_score / base).numpy(), label="mean q·k, random q, k (normalized)")
    ax.plot(d, (prof.ones_score / float(prof.ones_score[0])).numpy(), label="q = k = ones (normalized)", alpha=0.7)
    ax.set_xlabel("distance m − n")
    ax.set_ylabel("relative to distance 0")
    ax.set_title(f"{name}: the bound decays; the mean of random q·k does not")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return fig


# -- trained models -----------------------------------------------------------------------------
def attention(weights: torch.Tensor, *, title: str = "attention", tokens: list[str] | None = None) -> Figure:
    """A grid of attention maps: ``weights [layers, h, s, s]`` (one sequence)."""
    if weights.dim() != 4:
        raise ValueError(f"weights must be [layers, h, s, s], got shape {tuple(weights.shape)}")
    layers, heads = weights.shape[:2]
    fig = _figure(2.4 * heads + 1.0, 2.4 * layers + 0.6)
    axes = fig.subplots(layers, heads, squeeze=False)
    for li in range(layers):
        for hi in range(heads):
            ax = axes[li][hi]
            im = ax.imshow(weights[li, hi].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {li} head {hi}", fontsize=9)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="attention probability")
    fig.suptitle(title)
    return fig


@dataclasses.dataclass(frozen=True)
class TrainedAttention:
    """Attention maps of a tiny LM trained on the copy task (``posenc.pipeline.figures``):
    ``weights [layers, h, s, s]`` of one sequence, after ``steps`` steps at final ``loss``."""

    encoding: str
    steps: int
    loss: float
    weights: torch.Tensor


def copy_attention(maps: TrainedAttention) -> Figure:
    """The attention maps of a tiny copy-task LM, titled with its training."""
    return attention(
        maps.weights, title=f"{maps.encoding}: tiny LM after {maps.steps} steps on copy (loss {maps.loss:.2f})"
    )


KINDS = {
    "heatmap": heatmap,
    "similarity": similarity,
    "bias": bias_matrix,
    "buckets": buckets,
    "rotation": rotation,
    "wavelengths": wavelengths,
    "decay": decay,
}
GLOBAL_KINDS = {"magnitude": magnitude, "distance": distance, "scaling": scaling}


def plot(name: str, kind: str, **kwargs: Any) -> Figure:
    """The figure ``kind`` of encoding ``name`` (``name`` is ignored by the global kinds
    magnitude/distance/scaling, which draw every registered encoding or rule). Kinds of
    trained models (``attention``) are ``posenc.pipeline.figures.plot``'s."""
    if kind in GLOBAL_KINDS:
        if kind == "scaling":
            return scaling(**kwargs)
        return GLOBAL_KINDS[kind]([name] if name not in ("all", "") else None, **kwargs)
    if kind not in KINDS:
        kinds = sorted([*KINDS, *GLOBAL_KINDS])
        raise ValueError(f"unknown kind {kind!r}; kinds: {kinds}.{did_you_mean(kind, kinds)}")
    return KINDS[kind](name, **kwargs)
