"""The report's building blocks: a section is a title and a list of items (headings,
paragraphs, PNG figures, plotly curves, tables, notes) that ``templates/report.html``
renders in order. Figures are encoded here: matplotlib as palette PNGs (small), plotly
as JSON drawn by the page once its one embedded plotly.js is unpacked."""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
from collections.abc import Callable
from typing import Any

from posenc import analysis
from posenc.analysis.pretrained import PretrainedPositions
from posenc.viz.figures import FigureUnavailable

#: PNG resolution of the report's matplotlib figures (the docs' figures use 120).
DPI = 72


@dataclasses.dataclass(frozen=True)
class StudyResults:
    """A study's part of the report: its finished runs (``results.jsonl`` records), the
    tables of a metric by length (``posenc.experiments.summary.metric_tables``), its
    conclusions in sentences, the published-findings tables and where they came from."""

    source: str
    runs: list[dict[str, Any]]
    tables: list[Any]
    conclusions: list[str] = dataclasses.field(default_factory=list)
    published: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PretrainedSection:
    """A pretrained model's positions: ``card`` is the report card of its learned table
    (``None`` for other kinds), ``command`` the CLI command that draws its figure."""

    label: str
    info: PretrainedPositions
    card: analysis.ReportCard | None = None
    command: str | None = None


def png(fig: Any) -> str:
    """A matplotlib figure as a data URI: a PNG quantized to 256 colours (a third of
    the size of the RGBA one; the figures have few colours and smooth colormaps)."""
    from PIL import Image  # pillow comes with matplotlib; heavy: only when rendering

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def plot_json(fig: Any) -> str:
    """A plotly figure as JSON safe inside ``<script type="application/json">``."""
    import plotly.io as pio  # heavy: only when rendering

    return pio.to_json(fig, validate=False).replace("<", "\\u003c")


class Items:
    """Collects a section's items; ``ids`` numbers the plot divs of the whole page."""

    def __init__(self, ids: itertools.count | None = None) -> None:
        self.items: list[dict[str, Any]] = []
        self.ids = ids if ids is not None else itertools.count()

    def heading(self, text: str, muted: str = "") -> None:
        self.items.append({"type": "heading", "text": text, "muted": muted})

    def text(self, text: str) -> None:
        if text:
            self.items.append({"type": "text", "text": text})

    def note(self, caption: str, text: str) -> None:
        self.items.append({"type": "note", "caption": caption, "text": text})

    def figure(
        self, caption: str, make: Callable[[], Any], command: str | None = None, *, wide: bool = False, tag: str = ""
    ) -> bool:
        """Draw ``make()`` as a PNG (``wide``: the page's full width, else half; ``tag``:
        ``"encoding:kind"``, the page's ``data-figure``); a ``FigureUnavailable`` becomes
        a note saying why."""
        try:
            fig = make()
        except FigureUnavailable as err:
            self.note(caption.split(":")[0], f"not drawn: {err}")
            return False
        self.items.append(
            {"type": "figure", "caption": caption, "src": png(fig), "command": command, "wide": wide, "tag": tag}
        )
        return True

    def plot(self, caption: str, fig: Any) -> None:
        """A plotly figure (``None``: nothing to draw, skipped)."""
        if fig is not None:
            self.items.append(
                {"type": "plot", "caption": caption, "id": f"plot-{next(self.ids)}", "json": plot_json(fig)}
            )

    def table(
        self, caption: str, columns: list[str], rows: list[list[Any]], legend: dict[str, str] | None = None, **kw: Any
    ) -> None:
        self.items.append(
            {"type": "table", "caption": caption, "columns": columns, "rows": rows, "legend": legend or {}, **kw}
        )

    def extend(self, items: list[dict[str, Any]]) -> None:
        self.items.extend(items)
