"""Figures and the HTML report. matplotlib, plotly and jinja2 are imported lazily.

>>> from posenc import viz
>>> viz.save(viz.plot("sinusoidal", "heatmap"), "sinusoidal.png")
>>> viz.write_report("report.html")
"""

from __future__ import annotations

from typing import Any

__all__ = ["FigureUnavailable", "KINDS", "plot", "save", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("FigureUnavailable", "plot", "save", "KINDS", "GLOBAL_KINDS"):
        from posenc.viz import figures

        return getattr(figures, name)
    if name == "write_report":
        from posenc.viz.report import write_report

        return write_report
    raise AttributeError(f"module 'posenc.viz' has no attribute {name!r}")
