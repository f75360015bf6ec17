"""Pure math of the relative / bias family: distances, T5 buckets, ALiBi slopes,
KERPLE kernels, FIRE distances, Sandwich, Shaw clipping, CoPE positions.

Notation: ``s_q`` queries, ``s_k`` keys, ``h`` heads, ``d`` head_dim. Relative
position is ``k_pos - q_pos`` (Hugging Face T5's ``memory_position - query_position``);
distance is ``q_pos - k_pos`` (>= 0 for the keys a causal query sees).

Every function takes tensors and returns tensors; nothing here holds state. The same
elementwise functions are called by ``bias()`` (on ``[.., s_q, s_k]`` index grids) and
by the FlexAttention ``score_mod`` (on the kernel's scalar indices), so the two agree
by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posenc.functional.checks import check_positions

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def relative_positions(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """``k_pos - q_pos`` as int64: ``[s_q]``, ``[s_k]`` -> ``[s_q, s_k]``; any ``[b, s]``
    input gives ``[b, s_q, s_k]`` (a batch of 1 broadcasts)."""
    check_positions(q_positions, "q_positions")
    check_positions(k_positions, "k_positions")
    qp, kp = q_positions.long(), k_positions.long()
    if qp.dim() == 1 and kp.dim() == 1:
        return kp[None, :] - qp[:, None]  # [s_q, s_k]
    qp = qp if qp.dim() == 2 else qp[None]  # [b|1, s_q]
    kp = kp if kp.dim() == 2 else kp[None]  # [b|1, s_k]
    if qp.shape[0] != kp.shape[0] and 1 not in (qp.shape[0], kp.shape[0]):
        raise ValueError(f"q_positions has batch {qp.shape[0]} but k_positions has batch {kp.shape[0]}")
    return kp[:, None, :] - qp[:, :, None]  # [b, s_q, s_k]


def position_lookup(positions: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function ``(b, idx) -> position`` for a score_mod: ``positions`` ``[s]`` or
    ``[b, s]`` (a batch of 1 is shared by every batch element)."""
    if positions.dim() == 2 and positions.shape[0] == 1:
        positions = positions[0]
    if positions.dim() == 1:
        return lambda b, i: positions[i]
    return lambda b, i: positions[b, i]


def materialize_score_mod(score_mod: ScoreMod, batch: int, num_heads: int, s_q: int, s_k: int) -> torch.Tensor:
    """Evaluate ``score_mod`` on a zero score at every ``(b, h, q, k)`` -> ``[b, h, s_q, s_k]``.

    FlexAttention calls the score_mod with scalar indices inside its kernel; calling it
    with broadcastable index grids computes the same values eagerly (used by the tests
    to compare against ``bias()`` and to take gradients through the score_mod).
    """
    b = torch.arange(batch)[:, None, None, None]  # [b, 1, 1, 1]
    h = torch.arange(num_heads)[None, :, None, None]  # [1, h, 1, 1]
    qi = torch.arange(s_q)[None, None, :, None]  # [1, 1, s_q, 1]
    ki = torch.arange(s_k)[None, None, None, :]  # [1, 1, 1, s_k]
    out = score_mod(torch.zeros((), dtype=torch.float32), b, h, qi, ki)
    return out.expand(batch, num_heads, s_q, s_k)


# -- T5 ------------------------------------------------------------------------------
def t5_max_exact(num_buckets: int, bidirectional: bool) -> int:
    """Number of exact (one distance per bucket) buckets of one direction."""
    return (num_buckets // 2 if bidirectional else num_buckets) // 2


def t5_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5 relative-position bucket (Raffel et al. 2020, Mesh TensorFlow), int64, same shape.

    ``relative_position = k_pos - q_pos``. Bidirectional: half the buckets for keys
    after the query; causal: keys after the query share bucket 0. In one direction,
    distances ``< max_exact = n/2`` get their own bucket, larger ones
    ``max_exact + floor(log(r / max_exact) / log(max_distance / max_exact) * (n - max_exact))``
    capped at ``n - 1`` (so every distance ``>= max_distance`` shares the last bucket).
    Computed with the same float32 operations as Hugging Face's
    ``T5Attention._relative_position_bucket`` so the ids are bit-identical.
    """
    rp = relative_position.long()
    buckets = torch.zeros_like(rp)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets = buckets + (rp > 0).long() * n
        rp = rp.abs()
    else:
        rp = -torch.clamp(rp, max=0)
    max_exact = n // 2
    is_small = rp < max_exact
    # log(0) = -inf only where is_small holds; the where below discards it.
    large = max_exact + (torch.log(rp.float() / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)).to(
        torch.long
    )
    large = torch.clamp(large, max=n - 1)
    return buckets + torch.where(is_small, rp, large)


def t5_bucket_table(*, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket ids of relative positions ``-max_distance .. max_distance`` ``[2 * max_distance + 1]``.

    Every relative position beyond ``±max_distance`` has the bucket of ``±max_distance``
    (the last bucket of its direction), so ``table[clamp(r, -D, D) + D]`` is the
    bucket of any ``r``; the FlexAttention score_mod uses this lookup.
    """
    r = torch.arange(-max_distance, max_distance + 1)
    return t5_bucket(r, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)


# -- ALiBi ---------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes ``[h]`` float32 (Press et al. 2022, section 3).

    For ``h`` a power of two: ``m_i = 2 ** (-8 i / h)``, ``i = 1..h``. Otherwise take the
    ``n = 2 ** floor(log2 h)`` slopes of ``n`` heads, then the first ``h - n`` of every
    other slope of ``2n`` heads, ``2 ** (-4 i / n)`` for ``i = 1, 3, 5, ...``. Computed
    in float64, rounded once to float32.
    """
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    extra = [2.0 ** (-8.0 * i / (2 * n)) for i in range(1, 2 * n + 1)][0::2][: num_heads - n]
    return torch.tensor(slopes + extra, dtype=torch.float64).float()


def alibi(distance: torch.Tensor, slope: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """ALiBi bias ``-m * (q_pos - k_pos)`` (causal) or ``-m * |q_pos - k_pos|`` (symmetric).

    ``distance = q_pos - k_pos`` (any integer tensor) and ``slope`` broadcast together.
    The causal form is the paper's; on the keys a causal query sees (``distance >= 0``)
    both forms agree, and the masked ones are never used.
    """
    d = distance.float() if causal else distance.abs().float()
    return -slope * d


# -- KERPLE --------------------------------------------------------------------------
def kerple_log(distance: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """KERPLE logarithmic kernel ``-r1 * log(1 + r2 * |m - n|)`` (Chi et al. 2022, eq. 10)."""
    return -r1 * torch.log1p(r2 * distance.abs().to(r2.dtype))


def kerple_power(distance: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """KERPLE power kernel ``-r1 * |m - n| ** r2`` with ``0 < r2 <= 2`` (Chi et al. 2022, eq. 9).

    ``0 ** r2`` is 0 (r2 > 0), so the diagonal gets no bias. The gradient with respect
    to ``r2`` at distance 0 is taken as 0 (``x ** r`` has derivative ``log(x) x ** r``).
    """
    d = distance.abs().to(r1.dtype)
    # d ** r2 = exp(r2 log d), written so that d = 0 gives 0 with a finite gradient.
    safe = torch.where(d > 0, d, torch.ones_like(d))
    powered = torch.where(d > 0, torch.exp(r2 * torch.log(safe)), torch.zeros_like(d))
    return -r1 * powered


# -- FIRE ----------------------------------------------------------------------------
def fire_distance(
    q_pos: torch.Tensor, k_pos: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor, eps: float
) -> torch.Tensor:
    """FIRE's normalized input ``psi(i - j) / psi(max(i, L))`` with ``psi(x) = log(|c x| + 1)``
    (Li et al. 2023, eq. 4 with the threshold ``L`` of section 3.3).

    ``q_pos`` (i) and ``k_pos`` (j) broadcast; ``c`` and ``threshold`` are scalars.
    """
    i = q_pos.to(c.dtype)
    rel = torch.log(torch.abs(c * (i - k_pos.to(c.dtype))) + 1)
    norm = torch.log(torch.abs(c * torch.maximum(i, threshold)) + 1) + eps
    return rel / norm


# -- Sandwich ------------------------------------------------------------------------
def sandwich_inv_freq(sin_dim: int) -> torch.Tensor:
    """``1 / 10000 ** (2 i / d̄)`` for ``i = 1..d̄/2`` ``[d̄/2]`` float32 (Chi et al. 2023)."""
    i = torch.arange(1, sin_dim // 2 + 1, dtype=torch.float64)
    return (1.0 / 10000.0 ** (2.0 * i / sin_dim)).float()


def sandwich_scales(num_heads: int) -> torch.Tensor:
    """Per-head divisors ``8 h / H`` for ``h = 1..H`` ``[H]`` (ALiBi-like compression)."""
    return torch.arange(1, num_heads + 1, dtype=torch.float32) * 8.0 / num_heads


def sandwich(distance: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Sandwich kernel before head scaling: ``sum_i cos((m - n) w_i) - d̄/2`` (<= 0,
    0 on the diagonal), the inner product of sinusoidal embeddings minus its maximum.

    ``distance`` ``[...]`` -> ``[...]`` (sums over the ``d̄/2`` frequencies).
    """
    angles = distance.to(inv_freq.dtype)[..., None] * inv_freq  # [..., d̄/2]
    return torch.cos(angles).sum(-1) - inv_freq.shape[0]


# -- Shaw ----------------------------------------------------------------------------
def shaw_index(relative_position: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Row of Shaw's embedding table: ``clip(k_pos - q_pos, -K, K) + K`` in ``[0, 2K]``."""
    return relative_position.clamp(-max_distance, max_distance) + max_distance


# -- CoPE ----------------------------------------------------------------------------
def cope_positions(gates: torch.Tensor, max_pos: int) -> torch.Tensor:
    """Contextual positions ``p_ij = sum_{t=j}^{i} g_it`` (Golovneva et al. 2024, eq. 3),
    clamped to ``max_pos``.

    ``gates`` ``[..., s_q, s_k]`` must already be zero on masked keys; the sum runs
    from key ``j`` to the last key (a reversed cumulative sum).
    """
    return gates.flip(-1).cumsum(-1).flip(-1).clamp(max=max_pos)


def cope_interpolate(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Interpolate ``z[p] = q · e[p]`` at fractional positions (Golovneva et al. 2024, eq. 5):
    ``(p - floor p) z[ceil p] + (1 - (p - floor p)) z[floor p]``.

    ``logits`` ``[..., s_q, P]`` (one per integer position), ``positions``
    ``[..., s_q, s_k]`` in ``[0, P - 1]`` -> ``[..., s_q, s_k]``.
    """
    lo = positions.floor()
    w = positions - lo
    z_lo = logits.gather(-1, lo.long())
    z_hi = logits.gather(-1, positions.ceil().long())
    return w * z_hi + (1 - w) * z_lo
