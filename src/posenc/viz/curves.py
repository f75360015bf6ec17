"""The report's interactive curves (plotly figures) from report cards and study tables.

Readable with 18+ lines: every encoding keeps one colour and line style across figures
(10 colours × 4 dashes), traces are grouped by family in the legend (click a family's
title to hide or show it, an entry to toggle one line), and log axes are used only where
the values span decades, with ticks at 1-2-5 values (no unlabelled minor ticks).
plotly is imported lazily, inside the functions.
"""

from __future__ import annotations

import math
from typing import Any

from posenc import analysis

#: tab10: distinguishable and colour-blind friendlier than plotly's default.
COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
DASHES = ("solid", "dash", "dot", "dashdot")


class Styles:
    """One (colour, dash) per name, in order of first request: 40 distinct lines."""

    def __init__(self, names: list[str] | None = None) -> None:
        self._index: dict[str, int] = {}
        for n in names or []:
            self(n)

    def __call__(self, name: str) -> dict[str, Any]:
        i = self._index.setdefault(name, len(self._index))
        return {"color": COLOURS[i % len(COLOURS)], "dash": DASHES[(i // len(COLOURS)) % len(DASHES)], "width": 2}


def log_ticks(lo: float, hi: float) -> list[float]:
    """Labelled tick values for a log axis over ``[lo, hi]`` (both > 0): the coarsest of
    1 × 10^k, then 1-2-5, then 1-1.5-2-3-...-9 that gives at least three ticks."""
    lo, hi = max(lo, 1e-12), max(hi, lo * 1.0001)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [round(m * 10.0**k, 12) for k in decades for m in mantissas]
        ticks = [t for t in ticks if lo / 1.2 <= t <= hi * 1.2]
        if len(ticks) >= 3:
            return ticks[:: max(1, math.ceil(len(ticks) / 12))]
    return ticks


def _tick_text(v: float) -> str:
    return f"{v:g}" if 1e-3 <= v < 1e6 else f"{v:.0e}"


def log_axis(values: list[float], title: str) -> dict[str, Any]:
    """A plotly log axis over the positive ``values`` with 1-2-5 ticks."""
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)] or [1.0]
    ticks = log_ticks(min(pos), max(pos))
    return {"type": "log", "title": title, "tickvals": ticks, "ticktext": [_tick_text(t) for t in ticks]}


def _figure(title: str, x: dict[str, Any] | str, y: dict[str, Any] | str) -> Any:
    import plotly.graph_objects as go  # plotly is a heavy import: only when rendering

    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis=x if isinstance(x, dict) else {"title": x},
        yaxis=y if isinstance(y, dict) else {"title": y},
        legend={"groupclick": "toggleitem", "font": {"size": 11}},
        margin={"t": 50, "b": 45, "l": 60, "r": 20},
        height=430,
        template="plotly_white",
    )
    return fig


def _line(fig: Any, x: list, y: list, name: str, family: str, style: dict[str, Any], **kw: Any) -> None:
    import plotly.graph_objects as go  # heavy: only when rendering

    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode=kw.pop("mode", "lines"),
            name=name,
            line=style,
            legendgroup=family,
            legendgrouptitle_text=family,
            **kw,
        )
    )


def magnitude(cards: list[analysis.ReportCard], styles: Styles) -> Any | None:
    """‖PE(p)‖ / ‖token‖ of the additive encodings (log: integer spans 0.01..255)."""
    vec = [c for c in cards if c.kind == "vector"]
    if not vec:
        return None
    ys = {c.name: [v if v > 0 else None for v in c.magnitude.ratio.tolist()] for c in vec}
    fig = _figure(
        "‖PE(position)‖ / ‖token embedding‖",
        "position",
        log_axis([v for y in ys.values() for v in y] + [1.0], "ratio (log scale)"),
    )
    for c in vec:
        _line(fig, list(range(len(ys[c.name]))), ys[c.name], c.name, c.family, styles(c.name))
    fig.add_hline(y=1.0, line_dash="dash", line_color="black", annotation_text="token norm")
    return fig


def steps(cards: list[analysis.ReportCard], styles: Styles) -> Any | None:
    """Each step ‖PE(p+1) − PE(p)‖ over the encoding's median step (additive encodings)."""
    vec = [c for c in cards if c.kind == "vector"]
    if not vec:
        return None
    fig = _figure("Step between neighbouring positions / median step", "position p", "step / median step")
    for c in vec:
        s = c.continuity.steps.double()
        med = float(s.median()) or 1.0
        _line(fig, list(range(len(s))), (s / med).tolist(), c.name, c.family, styles(c.name))
    return fig


def lengths(name: str, family: str, style: dict[str, Any], lengths_: tuple[int, ...] = (8, 16, 32, 64)) -> Any:
    """The first component of ``name``'s vector at each sequence length."""
    probe = analysis.build(name, dim=8, num_heads=1, max_len=max(lengths_))
    fig = _figure(f"{name}: PE(p)[0] when the sequence has n tokens", "position p", "PE(p)[0]")
    for i, n in enumerate(lengths_):
        sig = analysis.signature(probe, n)[:, 0].tolist()
        st = {**style, "dash": DASHES[i % len(DASHES)]}
        _line(fig, list(range(n)), sig, f"n = {n}", "sequence length", st, mode="lines+markers")
    return fig


def profile(cards: list[analysis.ReportCard], styles: Styles, kind: str) -> Any | None:
    """Scores against distance: for ``rotation`` the mean |q·k| of random contents and
    RoFormer's bound (both relative to distance 0); for ``bias`` the bias itself."""
    chosen = [c for c in cards if c.kind == kind]
    if not chosen:
        return None
    if kind == "rotation":
        fig = _figure("Mean |score| of random q, k and RoFormer's bound", "distance m − n", "relative to distance 0")
    else:
        fig = _figure("Bias against distance (query at r, key at 0)", "distance r", "score(r) − score(0)")
    for c in chosen:
        p, st = c.profile, styles(c.name)
        d = p.distances.tolist()
        if kind == "rotation":
            _line(fig, d, (p.mean_abs_score / p.mean_abs_score[0].clamp_min(1e-12)).tolist(), c.name, c.family, st)
            if p.bound is not None:
                _line(fig, d, p.bound.tolist(), f"{c.name}: bound", "RoFormer bound", {**st, "dash": "dot"})
        else:
            _line(fig, d, (p.ones_score - p.ones_score[0]).tolist(), c.name, c.family, st)
    return fig


def distinct(cards: list[analysis.ReportCard], styles: Styles) -> Any | None:
    """Distinct position signals among positions (or distances) 0..D: flat = saturated."""
    chosen = [c for c in cards if c.kind != "none" and c.beyond.distinct is not None]
    if not chosen:
        return None
    L = chosen[0].config.train_length
    fig = _figure("Distinct position signals among 0..D", "D", "distinct signals")
    for c in chosen:
        _line(fig, list(range(len(c.beyond.distinct))), c.beyond.distinct.tolist(), c.name, c.family, styles(c.name))
    fig.add_vline(x=L, line_dash="dash", line_color="gray", annotation_text=f"trained length {L}")
    return fig


def unseen(cards: list[analysis.ReportCard], styles: Styles, clip: float = 10.0) -> Any | None:
    """Distance of each position past L to the nearest trained one (in median steps),
    clipped at ``clip`` (integer's grows to hundreds)."""
    chosen = [c for c in cards if c.beyond.unseen_distance is not None and c.kind != "none"]
    if not chosen:
        return None
    fig = _figure(
        f"Past the trained length: distance to the nearest trained signal (clipped at {clip:g})",
        "position (or distance) p",
        {"title": "median steps", "range": [0, clip * 1.05]},
    )
    for c in chosen:
        b = c.beyond
        y = b.unseen_distance.clamp(max=clip).tolist()
        _line(fig, list(range(b.train_length, b.train_length + len(y))), y, c.name, c.family, styles(c.name))
    return fig


def study_curve(table: Any, styles: Styles, families: dict[str, str]) -> Any:
    """A study table (``metric_tables``) as curves: metric against evaluation length,
    one line per (encoding, trained length), x on a log axis labelled at powers of two
    and the trained lengths; perplexity on a log axis (it spans decades)."""
    trained = {int(row[1]) for row in table.rows}
    ticks = [n for n in table.lengths if n & (n - 1) == 0 or n in trained]
    values = [c.mean for cells in table.cells for c in cells if c is not None]
    ppl = (table.metric or "").startswith("ppl")
    y = log_axis(values, f"{table.metric} (log scale)") if ppl else {"title": table.metric}
    x = {"type": "log", "title": "evaluation length", "tickvals": ticks, "ticktext": [str(n) for n in ticks]}
    fig = _figure(f"{table.task}: {table.metric} against evaluation length", x, y)
    for row, cells in zip(table.rows, table.cells, strict=True):
        xs = [n for n, c in zip(table.lengths, cells, strict=True) if c is not None]
        ys = [c.mean for c in cells if c is not None]
        err = [c.std for c in cells if c is not None]
        fam = families.get(row[0].partition("+")[0], "other")
        _line(fig, xs, ys, f"{row[0]} (L={row[1]})", fam, styles(row[0]), mode="lines+markers", error_y={"array": err})
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    for tl in sorted(trained):  # a trace, not a shape: shapes take log10 coordinates on log axes
        grey = {"color": "#888", "dash": "dash", "width": 1}
        _line(fig, [tl, tl], [lo, hi], f"trained length {tl}", "trained length", grey, hoverinfo="name")
    return fig
