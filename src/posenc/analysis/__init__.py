"""Pure measurements of positional encodings: numbers and dataclasses, no plots.

>>> from posenc import analysis
>>> card = analysis.report_card("sinusoidal")
>>> card.uniqueness.min_distance, card.continuity.ratio
"""

from posenc.analysis.card import (
    CARD_COLUMNS,
    CardConfig,
    ReportCard,
    card_for_probe,
    format_value,
    report_card,
    report_cards,
)
from posenc.analysis.measures import (
    Beyond,
    Continuity,
    DistanceProfile,
    LengthDependence,
    Magnitude,
    OrderBlindness,
    Relativeness,
    Uniqueness,
    beyond,
    continuity,
    distance_profile,
    distinct_counts,
    length_dependence,
    magnitude,
    order_blindness,
    relativeness,
    roformer_bound,
    uniqueness,
)
from posenc.analysis.probe import Probe, bias_matrix, build, rotation_pairs, scores, signature

__all__ = [
    "CARD_COLUMNS",
    "Beyond",
    "CardConfig",
    "Continuity",
    "DistanceProfile",
    "LengthDependence",
    "Magnitude",
    "OrderBlindness",
    "Probe",
    "Relativeness",
    "ReportCard",
    "Uniqueness",
    "beyond",
    "bias_matrix",
    "build",
    "card_for_probe",
    "continuity",
    "distance_profile",
    "distinct_counts",
    "format_value",
    "length_dependence",
    "magnitude",
    "order_blindness",
    "relativeness",
    "report_card",
    "report_cards",
    "rotation_pairs",
    "roformer_bound",
    "scores",
    "signature",
    "uniqueness",
]
