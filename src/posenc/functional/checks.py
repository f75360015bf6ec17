"""Input validation shared by every layer: clear ``TypeError``/``ValueError`` that name
the argument, never an ``IndexError`` or a silent broadcast later on."""

from __future__ import annotations

import difflib
import math
from numbers import Integral, Real

import torch


def did_you_mean(word: str, options: list[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``options`` to ``word``, or ``""``: the
    tail of every "unknown name" error."""
    close = difflib.get_close_matches(word, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_positions(positions: object, name: str = "positions") -> torch.Tensor:
    """Validate absolute token indices.

    Args:
        positions: int tensor ``[s]`` or ``[b, s]`` of non-negative token indices.
        name: the argument name used in error messages.

    Returns:
        the same tensor (unchanged).
    """
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer indices, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long), got {positions.dtype}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [s] or [b, s], got shape {tuple(positions.shape)}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {int(positions.min())}")
    return positions


def check_hidden(x: object, dim: int | None = None, name: str = "x") -> torch.Tensor:
    """Validate hidden states ``[b, s, dim]`` (floating point)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [b, s, d], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, but the encoding was built with dim={dim}")
    return x


def check_qk(q: object, k: object, head_dim: int | None = None) -> None:
    """Validate queries ``[b, h, s_q, d]`` and keys ``[b, h_kv, s_k, d]`` for a rotation:
    floating point tensors of one dtype and device, the same batch size and ``d`` (equal to
    ``head_dim`` when given)."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [b, h, s, d], got shape {tuple(x.shape)}")
        if head_dim is not None and x.shape[-1] != head_dim:
            raise ValueError(f"{name} has head dimension {x.shape[-1]}, but the encoding has head_dim={head_dim}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {q.shape[0]} and k {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got q {q.shape[-1]} and k {k.shape[-1]}")


def check_positions_match(positions: torch.Tensor, batch: int, seq: int, name: str = "positions") -> None:
    """Check that ``positions`` ``[s]`` or ``[b, s]`` fits a ``[batch, seq, ...]`` input."""
    if positions.shape[-1] != seq:
        raise ValueError(f"{name} has length {positions.shape[-1]} but the input has {seq} tokens")
    if positions.dim() == 2 and positions.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch size {positions.shape[0]} but the input has batch size {batch}")


def positive_int(name: str, value: object) -> int:
    """``value`` as an int > 0, else a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return int(value)


def nonnegative_int(name: str, value: object) -> int:
    """``value`` as an int >= 0, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def positive_float(name: str, value: object, *, minimum: float = 0.0, inclusive: bool = False) -> float:
    """``value`` as a finite float > ``minimum`` (or >= when ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < minimum or (v == minimum and not inclusive):
        op = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be {op} {minimum}, got {value!r}")
    return v


def one_of(name: str, value: object, choices: tuple) -> object:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
