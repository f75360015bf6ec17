"""Tables of absolute position vectors: the first half of the classic story.

Every function maps integer ``positions`` ``[...]`` to vectors ``[..., dim]`` in
float64 (exact for any index below 2**53); callers cast once to the activation dtype.
"""

from __future__ import annotations

import math

import torch


def _pos(positions: torch.Tensor) -> torch.Tensor:
    return positions.to(torch.float64)


def integer_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``PE(pos, i) = pos`` for every dimension ``i``.

    Shapes: positions ``[...]`` -> ``[..., dim]``.
    """
    return _pos(positions).unsqueeze(-1).expand(*positions.shape, dim).contiguous()


def normalized_table(positions: torch.Tensor, dim: int, length: int | None = None) -> torch.Tensor:
    """Positions scaled by a length, the same value in every dimension ``i``.

    Two definitions (the classic story's second step, e.g. Kazemnejad 2019 blog):

    * ``length=N`` (causal): ``PE(pos, i) = pos / (N - 1)`` for every position, with
      ``N`` fixed (a model's training length). A position's value never depends on the
      tokens after it; positions ``>= N`` give values above 1, which a model trained at
      length ``N`` never saw. ``N >= 2`` (``N - 1`` is the divisor).
    * ``length=None`` (non-causal): ``PE(pos, i) = pos / (L - 1)`` with ``L - 1`` the
      largest index in each row (``L`` the row's own length for ``arange(L)``): the same
      position gets a different value at every length, and every position's value
      depends on how many positions follow it. A length-1 row divides by 1, not 0, so
      position 0 maps to 0.

    Shapes: positions ``[s]`` or ``[b, s]`` -> ``[s, dim]`` or ``[b, s, dim]`` (float64).
    """
    p = _pos(positions)
    if length is None:
        denom = p.amax(dim=-1, keepdim=True) if p.numel() else torch.ones_like(p)  # [..., 1]
        denom = denom.clamp_min(1.0)
    else:
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2 (PE = pos / (length - 1)), got {length!r}")
        denom = torch.full_like(p[..., :1], float(length - 1))  # [..., 1]
    return (p / denom).unsqueeze(-1).expand(*positions.shape, dim).contiguous()  # [..., dim]


def binary_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``PE(pos, i) = bit i of pos`` (least significant bit first), values in {0, 1}.

    Positions that need more than ``dim`` bits raise ``ValueError``.

    Shapes: positions ``[...]`` -> ``[..., dim]``.
    """
    if positions.numel():
        top = int(positions.max())
        if dim < 63 and top >= 2**dim:
            raise ValueError(
                f"binary encoding with dim={dim} represents positions < 2**{dim} = {2**dim}; "
                f"got position {top} (it needs {top.bit_length()} bits)"
            )
    bits = torch.arange(dim, device=positions.device)  # [dim]
    return ((positions.long().unsqueeze(-1) >> bits) & 1).to(torch.float64)


def sine_periods(dim: int, min_period: int = 4, ratio: int = 2) -> torch.Tensor:
    """Periods ``P_i = min_period * ratio**i`` (float64 ``[dim]``), the continuous
    analogue of binary's bit periods 2, 4, 8, ..."""
    return min_period * torch.pow(torch.tensor(float(ratio), dtype=torch.float64), torch.arange(dim))


def sine_table(positions: torch.Tensor, dim: int, min_period: int = 4, ratio: int = 2) -> torch.Tensor:
    """``PE(pos, i) = sin(2 pi pos / P_i)`` with ``P_i = min_period * ratio**i``.

    No cosines: the vector repeats with period ``P_{dim-1}`` and, inside one period,
    ``sin(x) = sin(pi - x)`` folds distinct positions onto nearby vectors.

    Shapes: positions ``[...]`` -> ``[..., dim]``.
    """
    periods = sine_periods(dim, min_period, ratio).to(positions.device)  # [dim]
    # Reduce the phase modulo the (integer) period first: exact at any position.
    phase = torch.remainder(_pos(positions).unsqueeze(-1), periods) / periods  # [..., dim]
    return torch.sin(2 * math.pi * phase)


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017: ``PE(pos, 2i) = sin(pos / base**(2i/dim))``,
    ``PE(pos, 2i+1) = cos(pos / base**(2i/dim))``.

    Shapes: positions ``[...]`` -> ``[..., dim]`` (``dim`` even).
    """
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = _pos(positions).unsqueeze(-1) * inv_freq  # [..., dim/2]
    # Interleave: sin at even, cos at odd dimensions.
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # [..., dim]
