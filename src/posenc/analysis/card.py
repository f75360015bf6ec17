"""The report card: every measurement of one encoding, and one summary row per encoding."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from posenc.analysis import measures
from posenc.analysis.probe import Probe, build, supported_length
from posenc.functional.checks import positive_int
from posenc.registry import available, get


@dataclasses.dataclass(frozen=True)
class CardConfig:
    """Sizes at which every encoding is measured (small enough for a CPU in seconds)."""

    dim: int = 32  # small and fast; every encoding (also sine) builds at this width
    num_heads: int = 2
    horizon: int = 256
    train_length: int = 128
    beyond_horizon: int = 512
    relative_length: int = 48
    seed: int = 0
    #: Build encodings that take ``causal`` with this value; ``None``: each with its own
    #: default (t5, alibi and cope are causal by default, CoPE is defined causally).
    causal: bool | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("seed", "causal"):
                positive_int(f.name, getattr(self, f.name))
        if self.beyond_horizon <= self.train_length:
            raise ValueError(f"beyond_horizon must be > train_length, got {self.beyond_horizon}")


@dataclasses.dataclass(frozen=True)
class ReportCard:
    """All measurements of one encoding built at ``config`` sizes."""

    name: str
    family: str
    kind: str
    causal: bool  # the measurements' probe was built causal (``order*`` test both)
    params: dict[str, Any]
    config: CardConfig
    magnitude: measures.Magnitude
    length: measures.LengthDependence
    continuity: measures.Continuity
    uniqueness: measures.Uniqueness
    relativeness: measures.Relativeness
    profile: measures.DistanceProfile
    beyond: measures.Beyond
    order: measures.OrderBlindness
    order_causal: measures.OrderBlindness

    def row(self) -> dict[str, Any]:
        """One row of the report-card table (plain Python values)."""
        u, b = self.uniqueness, self.beyond
        if self.kind == "none":
            past = "no signal"
        elif b.error is not None:
            past = f"error (L={b.train_length})"
        elif b.saturation is not None and b.saturation < b.train_length:
            past = f"saturates at {b.saturation}"
        else:
            past = f"new ({b.max_unseen:.3g} steps)" if b.max_unseen else "nothing new"
        return {
            "encoding": self.name,
            "family": self.family,
            "signal": self.kind,
            "mask": "causal" if self.causal else "bidir.",
            "|PE|/|tok|": self.magnitude.max_ratio if self.kind == "vector" else None,
            "len. change": self.length.max_change,
            "max/med step": self.continuity.ratio,
            "min dist": u.min_distance,
            "period": u.period,
            "rel. dev.": self.relativeness.deviation,
            "past L": past,
            "blind": self.order.blind,
            "blind causal": self.order_causal.blind,
        }


def report_card(name: str, config: CardConfig | None = None, params: dict[str, Any] | None = None) -> ReportCard:
    """Measure encoding ``name`` (built with ``posenc.registry.create_for_model``)."""
    cfg = config or CardConfig()
    kw = dict(dim=cfg.dim, num_heads=cfg.num_heads, params=params, seed=cfg.seed)
    # Length-limited encodings (learned) get the trained length as their size.
    causal = default_causal(name) if cfg.causal is None else cfg.causal
    probe = build(name, max_len=cfg.train_length, causal=causal, **kw)
    probe_bidir = build(name, max_len=cfg.train_length, causal=False, **kw)
    probe_causal = build(name, max_len=cfg.train_length, causal=True, **kw)
    return card_for_probe(probe, cfg, probe_bidir=probe_bidir, probe_causal=probe_causal)


def default_causal(name: str) -> bool:
    """The default of encoding ``name``'s ``causal`` parameter (False if it has none)."""
    for f in dataclasses.fields(get(name).Params):
        if f.name == "causal" and f.default is not dataclasses.MISSING:
            return bool(f.default)
    return False


def card_for_probe(
    probe: Probe,
    config: CardConfig | None = None,
    *,
    probe_bidir: Probe | None = None,
    probe_causal: Probe | None = None,
    token_norm: float | None = None,
) -> ReportCard:
    """Measure an already built encoding (e.g. a pretrained model's table, see
    ``posenc.analysis.pretrained``). ``token_norm`` replaces the unit-variance token
    norm of the magnitude ratio; ``probe_bidir``/``probe_causal`` (default: ``probe``
    without/with a causal mask) are used for the two order-blindness tests."""
    cfg = config or CardConfig()
    if probe_bidir is None:
        probe_bidir = Probe(probe.name, probe.pe, probe.dim, probe.num_heads, causal=False)
    if probe_causal is None:
        probe_causal = Probe(probe.name, probe.pe, probe.dim, probe.num_heads, causal=True)
    # Encodings that refuse positions past some length (a learned table of max_len rows,
    # binary's 2**dim): measure inside, and let `beyond` look past that end.
    limit = supported_length(probe, cfg.beyond_horizon + 1)
    if limit < 2:
        raise ValueError(f"{probe.name} supports only {limit} position(s); nothing to measure")
    horizon = min(cfg.horizon, limit)
    train_length = limit if limit <= cfg.beyond_horizon else cfg.train_length
    beyond_horizon = max(cfg.beyond_horizon, train_length + 1)
    return ReportCard(
        name=probe.name,
        family=probe.family,
        kind=probe.kind,
        causal=probe.causal,
        params=probe.pe.params.asdict(),
        config=cfg,
        magnitude=measures.magnitude(probe, horizon, token_norm=token_norm),
        length=measures.length_dependence(probe, tuple(n for n in (16, 32, 64, horizon) if n <= horizon)),
        continuity=measures.continuity(probe, horizon),
        uniqueness=measures.uniqueness(probe, horizon),
        relativeness=measures.relativeness(probe, min(cfg.relative_length, horizon)),
        profile=measures.distance_profile(probe, horizon),
        beyond=measures.beyond(probe, train_length, beyond_horizon),
        order=measures.order_blindness(probe_bidir),
        order_causal=measures.order_blindness(probe_causal),
    )


def report_cards(names: list[str] | None = None, config: CardConfig | None = None) -> list[ReportCard]:
    """Report cards of ``names`` (default: every registered encoding), in order."""
    names = available() if names is None else list(names)
    return [report_card(n, config) for n in names]


#: What each column of ``ReportCard.row()`` measures (the CLI prints it under the table).
CARD_COLUMNS = {
    "encoding": "the registered name",
    "family": "none, additive, relative, bias, contextual or rotary",
    "signal": "what carries the position: vector PE(p), rotation (a fixed query rotated to p), bias (query p, key 0)",
    "mask": "the form measured: causal or bidirectional (each encoding's own default)",
    "|PE|/|tok|": "largest |PE(p)| within the horizon over the norm of a unit-variance token (vector signals)",
    "len. change": "largest change of a position's signal when only the sequence length changes",
    "max/med step": "largest |signal(p+1) - signal(p)| over the median step (1: every step alike)",
    "min dist": "distance between the two closest positions' signals within the horizon",
    "period": "the period if the signal repeats within the horizon",
    "rel. dev.": "how far scores of fixed content depend on anything but m - n (0: relative)",
    "past L": "positions beyond the trained length L: new signals (how far, in median steps), saturation or error",
    "blind": "attention outputs unchanged (up to the permutation) when tokens are permuted, no mask",
    "blind causal": "the same with a causal mask",
}


def format_value(value: Any) -> str:
    """A table cell: floats to 3 significant digits, inf/None/bools spelled out."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        if value == 0.0:
            return "0"
        return f"{value:.3g}"
    return str(value)
