"""Figures and the HTML report, drawn from plain tables, dataclasses and tensors: viz
trains nothing and reads no run folder (``posenc.pipeline`` gathers the data and calls
it). matplotlib, plotly and jinja2 are imported lazily.

>>> from posenc import viz
>>> viz.save(viz.plot("sinusoidal", "heatmap"), "sinusoidal.png")
"""

from __future__ import annotations

from typing import Any

__all__ = ["FigureUnavailable", "KINDS", "plot", "save"]


def __getattr__(name: str) -> Any:
    if name in ("FigureUnavailable", "plot", "save", "KINDS", "GLOBAL_KINDS"):
        # viz.figures imports the analysis stack: loaded on first use of these names
        from posenc.viz import figures

        return getattr(figures, name)
    raise AttributeError(f"module 'posenc.viz' has no attribute {name!r}")
