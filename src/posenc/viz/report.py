"""One self-contained HTML report that tells the story posenc is built on, in order:
attention is blind to order; the absolute encodings (integer → normalized → binary →
sine → sinusoidal → learned); relative (Shaw, T5); ALiBi and its relatives; RoPE; RoPE
scaling rules; what breaks past the trained length (with a study's conclusions, the
paper comparisons and a context-extension section when given); the report card.

Works offline: plotly.js is embedded once (gzip + base64, unpacked by the page with
the browser's ``DecompressionStream``: 2 MB instead of 4.8), each curve is JSON drawn
after it, matplotlib figures are palette PNG data URIs. All text is autoescaped (jinja2).

``render_report`` draws what it is given: report cards, the sentence test, attention maps
of tiny trained models, study records and tables, a pretrained model's positions. It
trains and loads nothing: ``posenc.pipeline.report.write_report`` gathers those.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import itertools
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

import posenc
from posenc import analysis
from posenc.analysis.order import SentenceOrder
from posenc.viz import curves
from posenc.viz.figures import TrainedAttention
from posenc.viz.items import Items, PretrainedSection, StudyResults, png
from posenc.viz.story import ORDER, story_order, story_sections
from posenc.viz.story_past import card_section, past_section

__all__ = ["PretrainedSection", "StudyResults", "plotly_bundle", "render_report"]

#: What the report shows, in two sentences (the page's introduction and the README's).
SUMMARY = (
    "The story of positional encoding, measured: why attention needs positions at all, then each "
    "encoding family in the order they were invented, each with its flaw measured and the figures "
    "that show it, and what breaks past the trained length."
)


def plotly_bundle() -> str:
    """plotly.js, gzipped and base64-encoded (the page unpacks it once)."""
    import plotly.offline  # heavy: only when rendering

    return base64.b64encode(gzip.compress(plotly.offline.get_plotlyjs().encode(), 9, mtime=0)).decode("ascii")


def _extra(section: dict[str, Any], index: int, ids: itertools.count) -> dict[str, Any]:
    """Normalize a caller's extra section: title, text, tables, plotly figures,
    matplotlib figures (``figures``: list of (caption, Figure))."""
    if not isinstance(section, dict) or not isinstance(section.get("title"), str):
        raise TypeError(f"extra_sections[{index}] must be a dict with a str 'title', got {section!r}")
    unknown = set(section) - {"title", "text", "tables", "plotly", "figures"}
    if unknown:
        raise ValueError(f"extra_sections[{index}] has unknown keys {sorted(unknown)}")
    items = Items(ids)
    for cap, fig in section.get("plotly", []):
        items.plot(cap, fig)
    for cap, fig in section.get("figures", []):
        items.items.append({"type": "figure", "caption": cap, "src": png(fig), "command": None})
    return {
        "title": section["title"],
        "text": section.get("text", ""),
        "tables": list(section.get("tables", [])),
        "items": items.items,
    }


def render_report(
    path: str | pathlib.Path,
    *,
    cards: list[analysis.ReportCard],
    config: analysis.CardConfig,
    study: StudyResults | None = None,
    attention: dict[str, TrainedAttention] | None = None,
    sentences: list[SentenceOrder] | None = None,
    pretrained: PretrainedSection | None = None,
    extra_sections: Iterable[dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Write the self-contained HTML report to ``path`` and return it.

    Args:
        cards: the report cards of the encodings shown (measured with ``config``).
        study: a study's runs, tables, conclusions and paper comparisons (step 7).
        attention: attention maps of tiny trained models, by encoding (drawn only for
            models that learned, and for ``none`` as its blindness, labelled).
        sentences: the sentence permutation tests of step 1 (``analysis.order``).
        pretrained: a pretrained model's positions (shown after ``learned``).
        extra_sections: further parts of step 7, each a dict ``{"title": str, "text":
            str, "tables": [{"caption", "columns", "rows"}], "plotly": [(caption,
            go.Figure)], "figures": [(caption, matplotlib Figure)]}``.
        progress: called with a short message before each stage.
    """
    import jinja2  # heavy import: only when rendering

    say = progress or (lambda msg: None)
    path = pathlib.Path(path)
    ids = itertools.count()
    cards = story_order(cards)
    extras = [_extra(extra, i, ids) for i, extra in enumerate(extra_sections or [])]
    say("drawing the story's figures")
    sections = story_sections(
        cards, sentences=list(sentences or []), attention=attention or {}, pretrained=pretrained, ids=ids
    )
    styles = curves.Styles([*ORDER, *(c.name for c in cards)])
    sections.append(past_section(cards, study=study, extras=extras, styles=styles, ids=ids))
    sections.append(card_section(cards, ids))
    say("writing the page")
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("posenc.viz", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    html = env.get_template("report.html").render(
        title="posenc report",
        summary=SUMMARY,
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=posenc.__version__,
        torch_version=torch.__version__,
        config=config,
        sections=sections,
        plotly_bundle=plotly_bundle(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
