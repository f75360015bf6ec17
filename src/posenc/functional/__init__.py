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

__all__ = [
    "binary_table",
    "check_positions",
    "integer_table",
    "normalized_table",
    "sine_periods",
    "sine_table",
    "sinusoidal_table",
]
