"""One self-contained HTML report: the report card of every encoding, every figure and,
when a study ran, its tables and curves. Works offline: plotly's JS is embedded once,
matplotlib figures are embedded as PNG data URIs. All text is autoescaped (jinja2).

``render_report`` draws what it is given: report cards, study records and tables,
attention maps of trained models, a pretrained model's positions. It trains and loads
nothing: ``posenc.pipeline.report.write_report`` gathers those and calls it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

import posenc
from posenc import analysis
from posenc.analysis.pretrained import PretrainedPositions
from posenc.viz import figures
from posenc.viz.figures import FigureUnavailable, TrainedAttention

FigureFactory = Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class StudyResults:
    """A study's section: its finished runs (``results.jsonl`` records), the tables of a
    metric by length (``posenc.experiments.summary.metric_tables``) and where they came from."""

    source: str
    runs: list[dict[str, Any]]
    tables: list[Any]


@dataclasses.dataclass(frozen=True)
class PretrainedSection:
    """A pretrained model's positions: ``card`` is the report card of its learned table
    (``None`` for other kinds), ``command`` the CLI command that draws its figure."""

    label: str
    info: PretrainedPositions
    card: analysis.ReportCard | None = None
    command: str | None = None


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plotly_div(fig: Any, div_id: str) -> str:
    import plotly.io as pio  # plotly is a heavy import: only when rendering

    return pio.to_html(
        fig, include_plotlyjs=False, full_html=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
    )


class _Figures:
    """Collects figures for one section, turning unavailable ones into notes."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, caption: str, make: FigureFactory, command: str | None = None) -> None:
        try:
            fig = make()
        except FigureUnavailable as err:
            self.items.append({"kind": "note", "caption": caption, "text": str(err)})
            return
        self.items.append({"kind": "png", "caption": caption, "src": _png(fig), "command": command})


# -- plotly figures from the report cards -------------------------------------------------------
def _card_curves(cards: list[analysis.ReportCard]) -> list[dict[str, Any]]:
    import plotly.graph_objects as go  # heavy: only when rendering

    out = []
    fig = go.Figure()
    for c in cards:
        if c.kind == "vector":
            fig.add_trace(go.Scatter(y=c.magnitude.ratio.tolist(), mode="lines", name=c.name))
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="token norm")
    fig.update_layout(
        title="‖PE(position)‖ / ‖token embedding‖ (additive encodings)",
        xaxis_title="position",
        yaxis_title="ratio (log)",
        yaxis_type="log",
    )
    out.append({"caption": "Magnitude: integer drowns the token; bounded encodings do not.", "fig": fig})

    fig = go.Figure()
    for c in cards:
        fig.add_trace(go.Scatter(y=c.continuity.steps.tolist(), mode="lines", name=c.name))
    fig.update_layout(
        title="Step ‖signal(p+1) − signal(p)‖", xaxis_title="position p", yaxis_title="step", yaxis_type="log"
    )
    out.append({"caption": "Continuity: binary jumps at powers of two.", "fig": fig})

    fig = go.Figure()
    for c in cards:
        if c.beyond.distinct is not None:
            fig.add_trace(go.Scatter(y=c.beyond.distinct.tolist(), mode="lines", name=c.name))
    L = cards[0].config.train_length if cards else 0
    fig.add_vline(x=L, line_dash="dash", annotation_text=f"trained length {L}")
    fig.update_layout(
        title="Distinct position signals among positions 0..D",
        xaxis_title="D",
        yaxis_title="distinct signals",
    )
    out.append({"caption": "Saturation: a flat curve means no new signal past that distance.", "fig": fig})

    fig = go.Figure()
    for c in cards:
        if c.kind != "none":
            p = c.profile
            fig.add_trace(go.Scatter(y=(p.mean_abs_score / p.mean_abs_score[0].clamp_min(1e-12)).tolist(), name=c.name))
            if p.bound is not None:
                fig.add_trace(go.Scatter(y=p.bound.tolist(), name=f"{c.name}: RoFormer bound", line_dash="dot"))
    fig.update_layout(
        title="Mean |score| of random q, k against distance (normalized at 0)",
        xaxis_title="distance m − n",
        yaxis_title="relative to distance 0",
    )
    out.append(
        {"caption": "Distance profile (Barbero et al. 2024): the bound decays; random scores do not.", "fig": fig}
    )
    return out


def _study_section(study: StudyResults) -> dict[str, Any]:
    import plotly.graph_objects as go  # heavy: only when rendering

    tables, plots = [], []
    runs = study.runs
    for t in study.tables:
        tables.append({"caption": t.title, "columns": t.columns, "rows": t.rows})
        # rows: [encoding, training length, cells...]; t.cells: the numbers behind them
        trained = {int(row[1]) for row in t.rows}
        # Label powers of two and the trained lengths only: 1..L is often every integer.
        ticks = [n for n in t.lengths if n & (n - 1) == 0 or n in trained]
        fig = go.Figure()
        for row, cells in zip(t.rows, t.cells, strict=True):
            xs = [n for n, c in zip(t.lengths, cells, strict=True) if c is not None]
            ys = [c.mean for c in cells if c is not None]
            err = [c.std for c in cells if c is not None]
            fig.add_trace(
                go.Scatter(x=xs, y=ys, error_y={"array": err}, mode="lines+markers", name=f"{row[0]} (L={row[1]})")
            )
        for tl in sorted(trained):
            fig.add_vline(x=tl, line_dash="dash", line_color="gray")
        fig.update_layout(
            title=f"{t.task}: {t.metric} against evaluation length",
            xaxis_title="evaluation length",
            yaxis_title=t.metric,
            xaxis={"type": "log", "tickvals": ticks, "ticktext": [str(n) for n in ticks]},
            yaxis_type="log" if t.metric.startswith("ppl") else "linear",
        )
        plots.append({"caption": f"{t.task}: train short (dashed), test long.", "fig": fig})
    runs_table = {
        "caption": "Runs",
        "columns": ["run", "task", "encoding", "seed", "train length", "wall time (s)", "git commit", "torch"],
        "rows": [
            [
                r["run_id"],
                r["task"],
                r["encoding"],
                str(r["seed"]),
                str(r["train_length"]),
                f"{float(r.get('wall_time_s', float('nan'))):.1f}",
                str(r.get("git_commit", ""))[:10],
                str(r.get("torch_version", "")),
            ]
            for r in runs
        ],
    }
    return {
        "title": "Study: train short, test long",
        "anchor": "study",
        "text": f"{len(runs)} finished runs from {study.source}.",
        "tables": [*tables, runs_table],
        "plotly": plots,
        "figures": [],
    }


def _pretrained_section(section: PretrainedSection) -> dict[str, Any]:
    """A learned table of a local transformers model (default all-MiniLM-L6-v2)."""
    info, label = section.info, section.label
    figs = _Figures()
    tables = []
    if section.card is not None:
        row = section.card.row()
        tables.append(
            {
                "caption": f"report card of {label}'s position table (|token| = its mean token-embedding norm)",
                "columns": list(row),
                "rows": [[analysis.format_value(v) for v in row.values()]],
            }
        )
        figs.add("learned position embeddings", lambda: figures.pretrained(info, name=label), section.command)
        text = (
            f"{label} ({info.model_type}) learns {info.table.shape[0]} absolute position vectors of width "
            f"{info.table.shape[1]} ({info.tensor_name})."
        )
    else:
        text = f"{label} ({info.model_type}) uses {info.kind} positions: {info.rope_parameters or info.extra}."
    return {
        "title": f"Pretrained: {label}",
        "anchor": "pretrained",
        "text": text,
        "tables": tables,
        "plotly": [],
        "figures": figs.items,
    }


def _extra(section: dict[str, Any], index: int) -> dict[str, Any]:
    """Normalize a caller's extra section: title, text, tables, plotly figures,
    matplotlib figures (``figures``: list of (caption, Figure))."""
    if not isinstance(section, dict) or not isinstance(section.get("title"), str):
        raise TypeError(f"extra_sections[{index}] must be a dict with a str 'title', got {section!r}")
    unknown = set(section) - {"title", "text", "tables", "plotly", "figures"}
    if unknown:
        raise ValueError(f"extra_sections[{index}] has unknown keys {sorted(unknown)}")
    figures = [
        {"kind": "png", "caption": cap, "src": _png(fig), "command": None} for cap, fig in section.get("figures", [])
    ]
    plots = [{"caption": cap, "fig": fig} for cap, fig in section.get("plotly", [])]
    return {
        "title": section["title"],
        "anchor": f"extra-{index}",
        "text": section.get("text", ""),
        "tables": list(section.get("tables", [])),
        "plotly": plots,
        "figures": figures,
    }


def _encoding_figures(cards: list[analysis.ReportCard], attention: dict[str, TrainedAttention]) -> list[dict[str, Any]]:
    sections = []
    for c in cards:
        figs = _Figures()
        # Sine is drawn at dim 4 so its repetition (period 32) is visible within the plot.
        size = {"dim": 4, "num_heads": 1} if c.name == "sine" else {"dim": 32, "num_heads": 2}
        opts = " --dim 4 --heads 1" if c.name == "sine" else " --dim 32 --heads 2"
        figs.add(
            "position × dimension",
            lambda n=c.name, s=size: figures.heatmap(n, **s),
            f"posenc plot {c.name} --kind heatmap{opts}",
        )
        figs.add(
            "position × position",
            lambda n=c.name, s=size: figures.similarity(n, **s),
            f"posenc plot {c.name} --kind similarity{opts}",
        )
        if c.kind == "bias":
            figs.add("bias matrices", lambda n=c.name: figures.bias_matrix(n), f"posenc plot {c.name} --kind bias")
            figs.add(
                "shared parameters (buckets)",
                lambda n=c.name: figures.buckets(n),
                f"posenc plot {c.name} --kind buckets",
            )
        if c.kind == "rotation":
            figs.add("rotation diagram", lambda n=c.name: figures.rotation(n), f"posenc plot {c.name} --kind rotation")
            figs.add("wavelengths", lambda n=c.name: figures.wavelengths(n), f"posenc plot {c.name} --kind wavelengths")
            figs.add("long-term decay", lambda n=c.name: figures.decay(n), f"posenc plot {c.name} --kind decay")
        if c.name in attention:
            maps = attention[c.name]
            figs.add(
                f"attention maps of a tiny LM after {maps.steps} steps on copy",
                lambda m=maps: figures.copy_attention(m),
                f"posenc plot {c.name} --kind attention",
            )
        sections.append({"name": c.name, "family": c.family, "flaw": posenc.get(c.name).flaw, "figures": figs.items})
    return sections


def render_report(
    path: str | pathlib.Path,
    *,
    cards: list[analysis.ReportCard],
    config: analysis.CardConfig,
    study: StudyResults | None = None,
    attention: dict[str, TrainedAttention] | None = None,
    pretrained: PretrainedSection | None = None,
    extra_sections: Iterable[dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Write the self-contained HTML report to ``path`` and return it.

    Args:
        cards: the report cards of the encodings shown (measured with ``config``), in order.
        study: a study's runs and tables: adds its section.
        attention: attention maps of tiny trained models, by encoding.
        pretrained: a pretrained model's positions: adds its section.
        extra_sections: further sections, each a dict ``{"title": str, "text": str,
            "tables": [{"caption", "columns", "rows"}], "plotly": [(caption, go.Figure)],
            "figures": [(caption, matplotlib Figure)]}``.
        progress: called with a short message before each stage.
    """
    import jinja2  # heavy imports (jinja2, plotly): only when rendering
    import plotly.offline

    say = progress or (lambda msg: None)
    path = pathlib.Path(path)
    names = [c.name for c in cards]
    columns = list(cards[0].row()) if cards else []
    card_rows = [[analysis.format_value(v) for v in c.row().values()] for c in cards]

    say("drawing figures")
    overview = _Figures()
    overview.add("magnitude", lambda: figures.magnitude(names), "posenc plot all --kind magnitude")
    overview.add("distance", lambda: figures.distance(names), "posenc plot all --kind distance")
    overview.add("RoPE scaling rules", lambda: figures.scaling(), "posenc plot rope --kind scaling")
    per_encoding = _encoding_figures(cards, attention or {})

    sections = []
    if pretrained is not None:
        sections.append(_pretrained_section(pretrained))
    if study is not None:
        sections.append(_study_section(study))
    for i, extra in enumerate(extra_sections or []):
        sections.append(_extra(extra, i))

    plot_id = iter(range(10**6))
    curves = [
        {"caption": c["caption"], "html": _plotly_div(c["fig"], f"plot-{next(plot_id)}")} for c in _card_curves(cards)
    ]
    for s in sections:
        s["plotly"] = [
            {"caption": p["caption"], "html": _plotly_div(p["fig"], f"plot-{next(plot_id)}")} for p in s["plotly"]
        ]

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("posenc.viz", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    html = env.get_template("report.html").render(
        title="posenc report",
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=posenc.__version__,
        torch_version=torch.__version__,
        config=config,
        columns=columns,
        card_rows=card_rows,
        card_names=[(c.name, c.family, posenc.get(c.name).formula, posenc.get(c.name).flaw) for c in cards],
        curves=curves,
        overview=overview.items,
        per_encoding=per_encoding,
        sections=sections,
        plotly_js=plotly.offline.get_plotlyjs(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
