"""The contextual family: positions counted by the content itself.

CoPE (Golovneva et al. 2024) replaces token counts by a sum of sigmoid gates, so a
"position" can count words, sentences or any pattern the gates learn.

Shapes: ``b`` batch, ``h`` heads, ``h_kv`` key heads, ``s_q`` queries, ``s_k`` keys,
``d`` head_dim, ``P`` = ``npos_max`` integer positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from einops import repeat
from torch import nn

from posenc.base import Params, PositionalEncoding
from posenc.functional import relative
from posenc.functional.checks import check_positions, positive_int
from posenc.registry import register


@dataclasses.dataclass(frozen=True)
class CoPEParams(Params):
    head_dim: int
    npos_max: int = 64
    causal: bool = True

    def validate(self) -> None:
        positive_int("head_dim", self.head_dim)
        if positive_int("npos_max", self.npos_max) < 2:
            raise ValueError(f"npos_max must be >= 2 (positions 0..npos_max-1 are interpolated), got {self.npos_max}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")


@register
class CoPE(PositionalEncoding):
    """Contextual Position Encoding (Golovneva et al. 2024).

    Formula (paper eqs. 3-5, as in the authors' reference code):
        g_ij = sigmoid(q_i · k_j / sqrt(d))     (zero on masked keys)
        p_ij = min(sum_{t=j}^{i} g_it, P - 1)
        z_i[n] = q_i · e[n]                     n = 0..P-1, e learned [d, P]
        b_ij = (p_ij - floor p_ij) z_i[ceil p_ij] + (1 - p_ij + floor p_ij) z_i[floor p_ij]

    Parameters: ``head_dim``; ``npos_max`` (P, the number of integer positions; larger
    contextual positions are clamped to P - 1); ``causal`` (gates of keys after the
    query are zero, by sequence index as in the attention mask). The embeddings ``e``
    are shared by all heads and start at zero (the authors' init), so a fresh CoPE adds
    no bias.

    Needs the content: ``bias(..., q=q, k=k)``. FlexAttention cannot compute it (the
    positions are cumulative sums over keys; a score_mod sees one score at a time):
    ``score_mod`` raises.
    """

    name = "cope"
    family = "contextual"
    reference = "Golovneva et al. 2024, Contextual Position Encoding: Learning to Count What's Important"
    formula = "p_ij = sum_{t=j}^{i} sigmoid(q_i k_t);  b_ij = q_i · interp(e, p_ij)"
    flaw = "O(s^2) extra work and memory per layer (gates, cumulative sums); no fused-kernel (flex) form"
    Params: ClassVar[type[Params]] = CoPEParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        p = self.params
        self.pos_emb = nn.Parameter(torch.zeros(p.head_dim, p.npos_max))  # [d, P]

    @property
    def needs_content(self) -> bool:
        return True

    def positions(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Contextual positions ``p_ij`` ``[b, h, s_q, s_k]`` (float)."""
        q, k = self._check(q, k)
        s_q, s_k = q.shape[2], k.shape[2]
        gates = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))  # [b, h, s_q, s_k]
        if self.params.causal:
            # The queries are the last s_q keys (KV cache): query i sees keys <= past + i.
            past = s_k - s_q
            qi = torch.arange(past, past + s_q, device=q.device)[:, None]  # [s_q, 1]
            kj = torch.arange(s_k, device=q.device)[None, :]  # [1, s_k]
            gates = gates * (kj <= qi).to(gates.dtype)
        return relative.cope_positions(gates, self.params.npos_max - 1)

    def bias(self, q_positions, k_positions, *, q=None, k=None) -> torch.Tensor:
        """Bias ``[b, h, s_q, s_k]`` from the queries ``q [b, h, s_q, d]`` and keys
        ``k [b, h_kv, s_k, d]`` (positions are only checked: CoPE counts by content)."""
        check_positions(q_positions, "q_positions")
        check_positions(k_positions, "k_positions")
        q, k = self._check(q, k)
        if q_positions.shape[-1] != q.shape[2] or k_positions.shape[-1] != k.shape[2]:
            raise ValueError(
                f"cope got {q.shape[2]} queries / {k.shape[2]} keys but positions of length "
                f"{q_positions.shape[-1]} / {k_positions.shape[-1]}"
            )
        pos = self.positions(q, k)  # [b, h, s_q, s_k]
        logits = q @ self.pos_emb.to(q.dtype)  # [b, h, s_q, P]
        return relative.cope_interpolate(logits, pos)

    def score_mod(self, q_positions, k_positions, *, q=None, k=None):
        raise NotImplementedError(
            "cope cannot run on backend='flex': its positions are cumulative sums of gates over the keys, "
            "and a FlexAttention score_mod sees one score at a time; use backend='sdpa'"
        )

    def _check(self, q, k) -> tuple[torch.Tensor, torch.Tensor]:
        if q is None or k is None:
            raise ValueError("cope needs the content: call bias(q_positions, k_positions, q=q, k=k)")
        d = self.params.head_dim
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] != d:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"cope expects {name} [b, heads, s, {d}] (head_dim={d}), got {shape}")
        h, h_kv = q.shape[1], k.shape[1]
        if h % h_kv or q.shape[0] != k.shape[0]:
            raise ValueError(f"cope got q {tuple(q.shape)} and k {tuple(k.shape)}: batch or head counts do not match")
        if h_kv != h:
            k = repeat(k, "b g s d -> b (g r) s d", r=h // h_kv)  # [b, h, s_k, d]
        return q, k
