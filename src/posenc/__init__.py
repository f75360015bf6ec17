"""posenc: a positional-encoding laboratory for PyTorch.

>>> import posenc
>>> posenc.available()
>>> pe = posenc.create("sinusoidal", dim=64)
"""

from posenc import encodings  # noqa: F401  (registers every encoding)
from posenc.attention import Attention, KVCache, LayerCache
from posenc.base import AdditiveEncoding, Params, PositionalEncoding
from posenc.functional.rope_scaling import rope_frequencies
from posenc.model import Transformer, TransformerConfig
from posenc.registry import available, create, get, load_plugins, register

__version__ = "0.1.0"

__all__ = [
    "AdditiveEncoding",
    "Attention",
    "KVCache",
    "LayerCache",
    "Params",
    "PositionalEncoding",
    "Transformer",
    "TransformerConfig",
    "available",
    "load_plugins",
    "create",
    "get",
    "register",
    "rope_frequencies",
]
