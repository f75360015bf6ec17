"""Rotary position embedding math: exact angles, the two layouts, xPos, axial 2-D.

The rotation itself is :func:`posenc.functional.apply_rotary` (``rope_fast``): the one
entry that rotates q and k; this module computes what it consumes (cos/sin tables, xPos
scales, grid coordinates) and converts weights between layouts.

Notation (as everywhere in posenc)::

    b batch, h heads, s sequence, d head_dim, r rotary dimension (even, <= d)
    inv_freq [r/2]      the frequency of each rotated pair (see rope_scaling)
    cos, sin [..., s, r/2]   one value per pair, not repeated per layout

RoPE (Su et al. 2021, RoFormer) rotates pair ``i`` of the vector at position ``m`` by
the angle ``m * inv_freq[i]``; then ``<R(m) q, R(n) k>`` depends only on ``m - n``.
Which dimensions form pair ``i`` is the *layout*:

* ``"half"`` (GPT-NeoX, Llama, Hugging Face ``rotate_half``): ``(i, i + r/2)``
* ``"interleaved"`` (GPT-J, Meta's original Llama, RoFormer): ``(2i, 2i + 1)``

Dimensions ``r .. d-1`` pass through unrotated (partial rotary).

**Exact angles.** The usual implementation forms ``position * inv_freq`` in float32,
whose rounding error grows with the position (at 2**20 one float32 ulp of the angle is
0.06 rad). Here the angle is formed in float64 (exact for positions < 2**53 up to one
float64 rounding) and cos/sin are taken in float64, then cast once to the cache dtype.
"""

from __future__ import annotations

import math

import torch

#: The two pairings of rotated dimensions (see the module docstring).
LAYOUTS = ("half", "interleaved")


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles ``positions[..., None] * inv_freq`` in float64.

    Shapes: positions ``[...]`` (int), inv_freq ``[r/2]`` -> ``[..., r/2]`` float64.
    """
    return positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64)  # [..., r/2]


def rope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_factor * cos(angle)``, ``attention_factor * sin(angle)``, computed in
    float64 (autocast off) and cast once to ``dtype``.

    Shapes: positions ``[...]`` -> cos, sin ``[..., r/2]``.
    """
    with torch.autocast(device_type=positions.device.type, enabled=False):
        angles = rope_angles(positions, inv_freq)  # [..., r/2] float64
        cos, sin = torch.cos(angles), torch.sin(angles)
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def expand_cos_sin(cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair cos/sin ``[..., r/2]`` -> per-dimension ``[..., r]`` in the layout's order
    (``cat(c, c)`` for half, ``repeat_interleave(c, 2)`` for interleaved), the form that
    Hugging Face's ``apply_rotary_pos_emb`` consumes."""
    if layout == "half":
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    if layout == "interleaved":
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")


# -- xPos ------------------------------------------------------------------------------
def xpos_zeta(rotary_dim: int, gamma: float = 0.4, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """xPos per-pair decay base ``zeta_i = (2i / r + gamma) / (1 + gamma)`` ``[r/2]``
    (Sun et al. 2022, eq. 8), in (0, 1)."""
    i2 = torch.arange(0, rotary_dim, 2, dtype=dtype, device=device)
    return (i2 / rotary_dim + gamma) / (1 + gamma)


def xpos_scales(
    positions: torch.Tensor, zeta: torch.Tensor, scale_base: float, center: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """xPos scales ``zeta ** ((m - c) / scale_base)`` (queries) and its inverse (keys).

    ``<q_m zeta^((m-c)/B), k_n zeta^(-(n-c)/B)> = zeta^((m-n)/B) <q_m, k_n>``: only
    ``m - n`` matters, so any center ``c`` gives the same scores; centering keeps the
    factors finite at large positions (float64, autocast off).

    Shapes: positions ``[...]`` -> two ``[..., r/2]`` float64 tensors.
    """
    with torch.autocast(device_type=positions.device.type, enabled=False):
        exponent = (positions.to(torch.float64) - center).unsqueeze(-1) / scale_base  # [..., 1]
        up = zeta.to(torch.float64) ** exponent  # [..., r/2]
    return up, 1.0 / up


def xpos_max_span(zeta_min: float, scale_base: float, dtype: torch.dtype) -> float:
    """Largest ``|m - c|`` for which ``zeta_min ** (-|m - c| / B)`` stays below a
    hundredth of ``dtype``'s largest value."""
    limit = math.log(torch.finfo(dtype).max / 100.0)
    return limit * scale_base / -math.log(zeta_min)


# -- axial 2-D (image patches) ---------------------------------------------------------
def grid_coords(positions: torch.Tensor, grid_width: int) -> torch.Tensor:
    """Flat patch indices -> (row, column) = ``(p // W, p % W)``.

    Shapes: positions ``[...]`` -> ``[..., 2]``.
    """
    return torch.stack([positions // grid_width, positions % grid_width], dim=-1)  # [..., 2]


# -- layout conversion of projection weights ----------------------------------------------
def interleaved_to_half_permutation(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Index ``perm`` with ``x_half = x_interleaved[..., perm]`` for one head.

    Interleaved pair ``(2i, 2i+1)`` becomes half pair ``(i, i + r/2)``; dimensions
    ``r..d-1`` stay. This is the permutation of Meta's Llama -> Hugging Face conversion.
    """
    r = head_dim if rotary_dim is None else rotary_dim
    if r % 2 or not 0 < r <= head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {r}")
    return torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, head_dim)])


def permute_qk_weight(
    weight: torch.Tensor, num_heads: int, head_dim: int, *, to: str = "half", rotary_dim: int | None = None
) -> torch.Tensor:
    """Permute the output rows of a q or k projection between RoPE layouts.

    A model whose ``W_q, W_k`` were trained with interleaved RoPE gives the same
    attention with ``permute_qk_weight(W, ..., to="half")`` and half RoPE (and back with
    ``to="interleaved"``): the permutation is applied to both q and k, and ``q . k`` is
    invariant under a common permutation of dimensions.

    Shapes: weight ``[num_heads * head_dim, in]`` or bias ``[num_heads * head_dim]`` ->
    same shape.
    """
    if weight.shape[0] != num_heads * head_dim:
        raise ValueError(
            f"weight has {weight.shape[0]} output rows; expected num_heads * head_dim = {num_heads}*{head_dim}"
        )
    perm = interleaved_to_half_permutation(head_dim, rotary_dim).to(weight.device)
    if to == "interleaved":
        perm = torch.argsort(perm)
    elif to != "half":
        raise ValueError(f"to must be one of {list(LAYOUTS)}, got {to!r}")
    w = weight.reshape(num_heads, head_dim, *weight.shape[1:])  # [h, d, ...]
    return w.index_select(1, perm).reshape(weight.shape)  # [(h d), ...]
