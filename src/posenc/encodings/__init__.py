"""Encodings as ``nn.Module``s, one file per family; importing registers them."""

from posenc.encodings import absolute, bias, contextual, rotary  # noqa: F401  (registers)
from posenc.encodings.absolute import Binary, Integer, Learned, NoPE, Normalized, Sine, Sinusoidal
from posenc.encodings.bias import FIRE, T5, ALiBi, BiasEncoding, Kerple, Sandwich, Shaw
from posenc.encodings.contextual import CoPE
from posenc.encodings.rotary import Proportional, RoPE, RoPE2D, XPos

__all__ = [
    "Binary",
    "Integer",
    "Learned",
    "NoPE",
    "Normalized",
    "Proportional",
    "RoPE",
    "RoPE2D",
    "Sine",
    "Sinusoidal",
    "XPos",
]
__all__ += ["ALiBi", "BiasEncoding", "CoPE", "FIRE", "Kerple", "Sandwich", "Shaw", "T5"]
