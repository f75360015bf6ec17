"""The relative / bias family: a score bias ``b(i, j)`` added to ``q·k / sqrt(d)``.

Every encoding here builds one elementwise function ``f(h, q_pos, k_pos)`` per call
(after precomputing at most a small per-head or per-distance table) and uses it twice:

* ``bias()`` evaluates it on index grids -> ``[h, s_q, s_k]`` (or ``[b, h, s_q, s_k]``
  for batched positions), for the SDPA backend;
* ``score_mod()`` returns ``(score, b, h, q_idx, kv_idx) -> score + f(h, q_pos[q_idx],
  k_pos[kv_idx])`` for FlexAttention, which evaluates it inside the kernel: no
  ``[h, s_q, s_k]`` tensor is ever built.

Shapes: ``h`` heads, ``s_q`` queries, ``s_k`` keys, ``d`` head_dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from posenc.base import Params, PositionalEncoding
from posenc.functional import relative
from posenc.functional.checks import (
    check_positions,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
)
from posenc.registry import register

ElementFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _index_grids(
    q_positions: torch.Tensor, k_positions: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcastable ``(h, q_pos, k_pos)`` grids: ``[h,1,1]``, ``[1,s_q,1]``, ``[1,1,s_k]``
    for ``[s]`` positions, or ``[1,h,1,1]``, ``[b,1,s_q,1]``, ``[b,1,1,s_k]`` for ``[b, s]``."""
    check_positions(q_positions, "q_positions")
    check_positions(k_positions, "k_positions")
    device = q_positions.device
    if q_positions.dim() == 1 and k_positions.dim() == 1:
        h = torch.arange(num_heads, device=device)[:, None, None]  # [h, 1, 1]
        return h, q_positions[None, :, None], k_positions.to(device)[None, None, :]
    qp = q_positions if q_positions.dim() == 2 else q_positions[None]  # [b|1, s_q]
    kp = k_positions if k_positions.dim() == 2 else k_positions[None]  # [b|1, s_k]
    if qp.shape[0] != kp.shape[0] and 1 not in (qp.shape[0], kp.shape[0]):
        raise ValueError(f"q_positions has batch {qp.shape[0]} but k_positions has batch {kp.shape[0]}")
    h = torch.arange(num_heads, device=device)[None, :, None, None]  # [1, h, 1, 1]
    return h, qp[:, None, :, None], kp.to(device)[:, None, None, :]


def _exact(t: torch.Tensor) -> torch.Tensor:
    """A learned tensor in the dtype the bias math runs in: float32, or float64 when the
    module was cast to float64 (``model.half()`` must not make 2**20 overflow)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class BiasEncoding(PositionalEncoding):
    """Base of the content-free bias encodings: subclasses implement ``element_fn``.

    Precision: the bias is computed in float32 (float64 if the parameters are float64)
    whatever the activation dtype; float buffers (slopes, frequencies) stay float32
    under ``model.to(bfloat16)`` (only their device follows) and learned parameters
    are upcast before use. Attention casts the finished bias to the activation dtype.
    """

    family: ClassVar[str] = "bias"
    translation_invariant: ClassVar[bool] = True  # b(i, j) = f(i - j); FIRE overrides

    def _apply(self, fn, recurse: bool = True):
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        for n in kept:
            self._buffers.pop(n)
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        for n, b in kept.items():
            self._buffers[n] = b.to(device)
        return self

    def element_fn(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> ElementFn:
        """``f(h, q_pos, k_pos) -> bias`` (float32, broadcasting) for these positions."""
        raise NotImplementedError

    def bias(self, q_positions, k_positions, *, q=None, k=None) -> torch.Tensor:
        """Bias ``[h, s_q, s_k]`` for ``[s]`` positions, ``[b, h, s_q, s_k]`` for ``[b, s]``."""
        h, qp, kp = _index_grids(q_positions, k_positions, self.params.num_heads)
        fn = self.element_fn(q_positions, k_positions)
        out = fn(h, qp, kp)
        shape = torch.broadcast_shapes(h.shape, qp.shape, kp.shape)
        return out.expand(shape)

    def score_mod(self, q_positions, k_positions, *, q=None, k=None) -> relative.ScoreMod:
        """FlexAttention score_mod adding ``bias()``'s value at ``(h, q_idx, kv_idx)``."""
        check_positions(q_positions, "q_positions")
        check_positions(k_positions, "k_positions")
        fn = self.element_fn(q_positions, k_positions)
        q_at, k_at = relative.position_lookup(q_positions), relative.position_lookup(k_positions)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + fn(h, q_at(b, q_idx), k_at(b, kv_idx))

        return score_mod


# -- T5 ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T5Params(Params):
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    causal: bool = True

    def validate(self) -> None:
        positive_int("num_heads", self.num_heads)
        if positive_int("num_buckets", self.num_buckets) < 2:
            raise ValueError(f"num_buckets must be >= 2, got {self.num_buckets}")
        positive_int("max_distance", self.max_distance)
        _check_bool("causal", self.causal)
        if not self.causal and self.num_buckets < 4:
            raise ValueError(f"bidirectional t5 (causal=False) needs num_buckets >= 4, got {self.num_buckets}")
        max_exact = relative.t5_max_exact(self.num_buckets, not self.causal)
        if self.max_distance <= max_exact:
            raise ValueError(
                f"max_distance must be > {max_exact} (the exact buckets of num_buckets={self.num_buckets}, "
                f"causal={self.causal}); got {self.max_distance}"
            )


@register
class T5(BiasEncoding):
    """T5 relative attention bias (Raffel et al. 2020, section 2.1): one learned scalar
    per (bucket, head); buckets are exact for small distances, logarithmic up to
    ``max_distance``, and shared beyond it.

    Formula: ``b_h(i, j) = w[bucket(j - i), h]``, bucket as in ``functional.relative.t5_bucket``
    (identical to Hugging Face ``T5Attention._relative_position_bucket``); ``causal=False``
    is T5's bidirectional encoder form (half the buckets for keys after the query).

    Parameters: ``num_heads``, ``num_buckets`` (>= 2; >= 4 bidirectional), ``max_distance``
    (> the number of exact buckets), ``causal``. Weight ``[num_buckets, num_heads]``.
    """

    name = "t5"
    reference = "Raffel et al. 2020, Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
    formula = "b_h(i, j) = w[bucket(j - i), h], log-spaced buckets up to max_distance"
    flaw = "every distance >= max_distance shares one bucket: no resolution far away; the bias must be learned"
    Params: ClassVar[type[Params]] = T5Params

    def __init__(self, **params) -> None:
        super().__init__(**params)
        p = self.params
        self.weight = nn.Parameter(torch.randn(p.num_buckets, p.num_heads) * 0.02)  # [buckets, h]
        table = relative.t5_bucket_table(
            bidirectional=not p.causal, num_buckets=p.num_buckets, max_distance=p.max_distance
        )
        self.register_buffer("bucket_table", table, persistent=False)  # [2 D + 1]

    def buckets(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Bucket ids ``[s_q, s_k]`` (or ``[b, s_q, s_k]``)."""
        p = self.params
        rel = relative.relative_positions(q_positions, k_positions)
        return relative.t5_bucket(
            rel, bidirectional=not p.causal, num_buckets=p.num_buckets, max_distance=p.max_distance
        )

    def element_fn(self, q_positions, k_positions) -> ElementFn:
        dmax = self.params.max_distance
        # Bias of every relative position -D..D per head: [h, 2 D + 1] (beyond ±D the
        # bucket is that of ±D). Differentiable in the weight.
        per_distance = _exact(self.weight)[self.bucket_table.to(self.weight.device)].t()  # [h, 2 D + 1]

        def fn(h, qp, kp):
            return per_distance[h, (kp - qp).clamp(-dmax, dmax) + dmax]

        return fn


# -- ALiBi ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AlibiParams(Params):
    num_heads: int
    causal: bool = True

    def validate(self) -> None:
        positive_int("num_heads", self.num_heads)
        _check_bool("causal", self.causal)


@register
class ALiBi(BiasEncoding):
    """Attention with Linear Biases (Press et al. 2022): a fixed per-head slope times
    the distance.

    Formula: ``b_h(i, j) = -m_h (i - j)`` (causal) or ``-m_h |i - j|`` (``causal=False``,
    the symmetric encoder form); ``m_h = 2 ** (-8 h / H)`` for ``H`` a power of two, the
    paper's interleaving rule otherwise (``functional.relative.alibi_slopes``).
    """

    name = "alibi"
    reference = (
        "Press et al. 2022, Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation"
    )
    formula = "b_h(i, j) = -m_h * (i - j),  m_h = 2^(-8h/H)"
    flaw = "a fixed recency prior: distant tokens are penalised linearly, so long-range retrieval is hard"
    Params: ClassVar[type[Params]] = AlibiParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.register_buffer("slopes", relative.alibi_slopes(self.params.num_heads), persistent=False)  # [h]

    def element_fn(self, q_positions, k_positions) -> ElementFn:
        slopes, causal = self.slopes, self.params.causal
        return lambda h, qp, kp: relative.alibi(qp - kp, slopes[h], causal=causal)


# -- KERPLE --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KerpleParams(Params):
    num_heads: int
    variant: str = "log"
    eps: float = 1e-2

    def validate(self) -> None:
        positive_int("num_heads", self.num_heads)
        one_of("variant", self.variant, ("log", "power"))
        positive_float("eps", self.eps)
        if self.variant == "power" and self.eps > 2:
            raise ValueError(f"eps must be <= 2 for the power variant (r2 in [eps, 2]), got {self.eps}")


@register
class Kerple(BiasEncoding):
    """KERPLE (Chi et al. 2022): conditionally positive definite kernels of the distance,
    with two learned positive parameters per head.

    Formula: ``log``: ``b_h = -r1_h log(1 + r2_h |i - j|)``; ``power``:
    ``b_h = -r1_h |i - j| ** r2_h`` with ``r2_h <= 2``. As in the authors' code the
    parameters are kept in range by clamping (``r >= eps``, power ``r2 <= 2``); here the
    clamp is applied in the forward (not in place), so a parameter outside the range
    gets no gradient. Initialised ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)`` (power: ``U(0, 2)``).
    """

    name = "kerple"
    reference = "Chi et al. 2022, KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation"
    formula = "log: -r1 log(1 + r2 |i-j|);  power: -r1 |i-j|^r2"
    flaw = "a monotone recency prior like ALiBi (learned shape); the power variant with r2 > 1 decays very fast"
    Params: ClassVar[type[Params]] = KerpleParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        h = self.params.num_heads
        self.r1 = nn.Parameter(torch.rand(h) * 2)  # [h]
        self.r2 = nn.Parameter(torch.rand(h) * (2 if self.params.variant == "power" else 1))  # [h]

    def positive_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clamped ``(r1, r2)`` actually used, each ``[h]``."""
        eps = self.params.eps
        r1 = _exact(self.r1).clamp(min=eps)
        r2 = (
            _exact(self.r2).clamp(min=eps, max=2.0)
            if self.params.variant == "power"
            else _exact(self.r2).clamp(min=eps)
        )
        return r1, r2

    def element_fn(self, q_positions, k_positions) -> ElementFn:
        r1, r2 = self.positive_params()
        kernel = relative.kerple_power if self.params.variant == "power" else relative.kerple_log
        return lambda h, qp, kp: kernel(qp - kp, r1[h], r2[h])


# -- FIRE ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FireParams(Params):
    num_heads: int
    mlp_width: int = 32
    init_c: float = 0.1
    init_L: float = 512.0
    eps: float = 1e-6

    def validate(self) -> None:
        positive_int("num_heads", self.num_heads)
        positive_int("mlp_width", self.mlp_width)
        positive_float("init_c", self.init_c)
        positive_float("init_L", self.init_L)
        positive_float("eps", self.eps)


@register
class FIRE(BiasEncoding):
    """FIRE, Functional Interpolation for Relative Positions (Li et al. 2023): a small
    MLP of the log-transformed distance, normalised by the query position.

    Formula: ``b(i, j) = f_theta( psi(i - j) / psi(max(i, L)) )``, ``psi(x) = log(|c x| + 1)``,
    ``f_theta: R -> R^H`` a one-hidden-layer ReLU MLP (width ``mlp_width``); ``c``
    (init ``init_c``) and the threshold multiplier of ``L = |mult * init_L|`` are
    learned ("progressive interpolation": the input stays in [0, 1] for i >= L).

    The score_mod evaluates the MLP inside the kernel as an unrolled sum over the
    hidden units, ``b_h = b2_h + sum_u W2[h, u] relu(W1[u] x + b1[u])``.
    """

    name = "fire"
    reference = "Li et al. 2023, Functional Interpolation for Relative Positions Improves Long Context Transformers"
    formula = "b(i, j) = MLP( log(c|i-j| + 1) / log(c max(i, L) + 1) )"
    flaw = "costly: an MLP per score (mlp_width multiply-adds in the kernel); learned, so needs training"
    Params: ClassVar[type[Params]] = FireParams
    translation_invariant = False  # normalised by the query position

    def __init__(self, **params) -> None:
        super().__init__(**params)
        p = self.params
        self.mlp = nn.Sequential(nn.Linear(1, p.mlp_width), nn.ReLU(), nn.Linear(p.mlp_width, p.num_heads))
        self.c = nn.Parameter(torch.tensor(float(p.init_c)))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init_L", torch.tensor(float(p.init_L)), persistent=False)

    def score_mod(self, q_positions, k_positions, *, q=None, k=None) -> relative.ScoreMod:
        """As ``BiasEncoding.score_mod``; training on CUDA is refused up front (see below)."""
        if q_positions.is_cuda and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Inductor's FlexAttention backward on CUDA (tests/test_gpu.py) refuses a score_mod
            # that indexes one trainable tensor more than once, which the unrolled MLP does
            # (w2[h, u] for every u). Cloning one tensor per unit avoids that but breaks
            # dynamo's dynamic-shape recompiles on CPU (torch 2.13).
            raise NotImplementedError(
                "fire cannot be trained on backend='flex' on CUDA: FlexAttention's compiled backward refuses "
                "its score_mod (the MLP weights are indexed once per hidden unit); train with backend='sdpa', "
                "or run backend='flex' under torch.no_grad() for inference"
            )
        return super().score_mod(q_positions, k_positions, q=q, k=k)

    def element_fn(self, q_positions, k_positions) -> ElementFn:
        w1 = _exact(self.mlp[0].weight)[:, 0]  # [u]
        b1 = _exact(self.mlp[0].bias)  # [u]
        w2 = _exact(self.mlp[2].weight)  # [h, u]
        b2 = _exact(self.mlp[2].bias)  # [h]
        c, eps = _exact(self.c), self.params.eps
        threshold = torch.abs(_exact(self.L_multiplier) * self.init_L)
        width = self.params.mlp_width

        def fn(h, qp, kp):
            x = relative.fire_distance(qp, kp, c, threshold, eps)
            out = b2[h]
            for u in range(width):  # unrolled: FlexAttention scores one element at a time
                out = out + w2[h, u] * torch.relu(w1[u] * x + b1[u])
            return out

        return fn


# -- Sandwich ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SandwichParams(Params):
    num_heads: int
    sin_dim: int = 128

    def validate(self) -> None:
        positive_int("num_heads", self.num_heads)
        if positive_int("sin_dim", self.sin_dim) % 2:
            raise ValueError(f"sin_dim must be even, got {self.sin_dim}")


@register
class Sandwich(BiasEncoding):
    """Sandwich (Chi et al. 2023): the inner product of two sinusoidal position
    embeddings of width ``sin_dim`` (d̄), shifted to be <= 0 and compressed per head.

    Formula: ``b_h(i, j) = (sum_{k=1}^{d̄/2} cos((i - j) / 10000^(2k/d̄)) - d̄/2) / (8 h / H)``,
    ``h = 1..H``. No learned parameters. Symmetric in ``i - j`` (cos is even), so the
    causal and encoder forms coincide.

    The cosine sum depends only on ``i - j``: both ``bias`` and ``score_mod`` look it
    up in a per-distance table ``[max(i - j) - min(i - j) + 1]`` built per call.
    """

    name = "sandwich"
    reference = "Chi et al. 2023, Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis"
    formula = "b_h(i, j) = (sum_k cos((i-j) w_k) - d̄/2) / (8h/H),  w_k = 10000^(-2k/d̄)"
    flaw = "the cosine sum oscillates at long distances instead of decaying monotonically"
    Params: ClassVar[type[Params]] = SandwichParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.register_buffer("inv_freq", relative.sandwich_inv_freq(self.params.sin_dim), persistent=False)  # [d̄/2]
        self.register_buffer("scales", relative.sandwich_scales(self.params.num_heads), persistent=False)  # [h]

    def element_fn(self, q_positions, k_positions) -> ElementFn:
        lo = int(q_positions.min()) - int(k_positions.max()) if q_positions.numel() and k_positions.numel() else 0
        hi = int(q_positions.max()) - int(k_positions.min()) if q_positions.numel() and k_positions.numel() else 0
        # Table length rounded up to a multiple of 128 so a compiled kernel's captured
        # table keeps its shape across decoding steps; lo is a tensor for the same reason.
        size = -(-(hi - lo + 1) // 128) * 128
        dist = torch.arange(lo, lo + size, device=self.inv_freq.device)
        table = relative.sandwich(dist, self.inv_freq)  # [size]
        scales, offset = self.scales, torch.tensor(lo, device=dist.device)
        return lambda h, qp, kp: table[qp - kp - offset] / scales[h]


# -- Shaw ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShawParams(Params):
    head_dim: int
    max_distance: int = 16

    def validate(self) -> None:
        positive_int("head_dim", self.head_dim)
        nonnegative_int("max_distance", self.max_distance)


@register
class Shaw(PositionalEncoding):
    """Relative position representations (Shaw et al. 2018), key side: a learned vector
    per clipped relative position, dotted with the query.

    Formula: ``e_ij = q_i · (k_j + a_ij) / sqrt(d)``, ``a_ij = w[clip(j - i, -K, K)]``, so
    the bias is ``q_i · w[clip(j - i)] / sqrt(d)``; ``K = max_distance`` (the paper's
    clip distance ``k``, >= 0). The ``2K + 1`` vectors of width ``head_dim`` are shared
    by all heads, as in the paper. The value-side embeddings ``a^V`` are not modelled
    (the bias hook cannot change values).

    Needs the content (``needs_content``): ``bias(..., q=q)`` with ``q [b, h, s_q, d]``.
    """

    name = "shaw"
    translation_invariant = True  # a_(j - i), clipped
    family = "relative"
    reference = "Shaw et al. 2018, Self-Attention with Relative Position Representations"
    formula = "e_ij = q_i (k_j + w[clip(j - i, -K, K)])^T / sqrt(d)"
    flaw = "all distances beyond K look the same; the bias is content-dependent so it is rebuilt per layer"
    Params: ClassVar[type[Params]] = ShawParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        p = self.params
        self.weight = nn.Parameter(torch.randn(2 * p.max_distance + 1, p.head_dim) * 0.02)  # [2K + 1, d]

    @property
    def needs_content(self) -> bool:
        return True

    def _logits(self, q: torch.Tensor | None) -> torch.Tensor:
        if q is None:
            raise ValueError("shaw needs the queries: call bias(q_positions, k_positions, q=q) with q [b, h, s_q, d]")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[-1] != self.params.head_dim:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"shaw expects q [b, h, s_q, {self.params.head_dim}] (head_dim), got {shape}")
        # One score per (query, clipped relative position): [b, h, s_q, 2K + 1].
        return q @ self.weight.to(q.dtype).t() / math.sqrt(self.params.head_dim)

    def bias(self, q_positions, k_positions, *, q=None, k=None) -> torch.Tensor:
        """Bias ``[b, h, s_q, s_k]`` in the dtype of ``q``."""
        z = self._logits(q)  # [b, h, s_q, 2K + 1]
        b, h, s_q, _ = z.shape
        if q_positions.shape[-1] != s_q:
            raise ValueError(f"q has {s_q} queries but q_positions has {q_positions.shape[-1]}")
        idx = relative.shaw_index(relative.relative_positions(q_positions, k_positions), self.params.max_distance)
        idx = idx.to(z.device)
        idx = idx[None, None] if idx.dim() == 2 else idx[:, None]  # [b|1, 1, s_q, s_k]
        idx = idx.expand(b, h, s_q, idx.shape[-1])  # [b, h, s_q, s_k]
        return z.gather(-1, idx)

    def score_mod(self, q_positions, k_positions, *, q=None, k=None) -> relative.ScoreMod:
        """In-kernel lookup of the ``[b, h, s_q, 2K + 1]`` query·embedding scores: the
        content enters through that small tensor, never an ``[h, s_q, s_k]`` one."""
        check_positions(q_positions, "q_positions")
        check_positions(k_positions, "k_positions")
        z = self._logits(q)  # [b, h, s_q, 2K + 1]
        dmax = self.params.max_distance
        q_at, k_at = relative.position_lookup(q_positions), relative.position_lookup(k_positions)

        def score_mod(score, b, h, q_idx, kv_idx):
            rel = (k_at(b, kv_idx) - q_at(b, q_idx)).clamp(-dmax, dmax) + dmax
            return score + z[b, h, q_idx, rel]

        return score_mod
