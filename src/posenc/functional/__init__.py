"""Pure tensor math for positional encodings: no ``nn.Module``, no state.

Everything above this package (encodings, attention, analysis) calls these
functions; nothing here imports from above.
"""

from posenc.functional.absolute import (
    binary_table,
    integer_table,
    normalized_table,
    sine_periods,
    sine_table,
    sinusoidal_table,
)
from posenc.functional.checks import check_positions
from posenc.functional.rope import permute_qk_weight, rope_angles, rope_cos_sin
from posenc.functional.rope_fast import apply_rotary
from posenc.functional.rope_scaling import SCALING_RULES, ScalingRule, parse_rope_parameters, rope_frequencies

__all__ = [
    "SCALING_RULES",
    "ScalingRule",
    "apply_rotary",
    "parse_rope_parameters",
    "permute_qk_weight",
    "rope_angles",
    "rope_cos_sin",
    "rope_frequencies",
    "binary_table",
    "check_positions",
    "integer_table",
    "normalized_table",
    "sine_periods",
    "sine_table",
    "sinusoidal_table",
]
