"""DAPE as a posenc plugin: an encoding posenc does not ship, registered from outside.

    POSENC_PLUGINS=examples/dape_plugin.py posenc check dape
    posenc --plugin examples/dape_plugin.py compare dape --preset smoke --baselines <results.jsonl>

docs/plugins.md walks through it: the class, the contract, the leaderboard.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

import posenc
from posenc.functional.checks import check_positions, one_of, positive_int


@dataclasses.dataclass(frozen=True)
class DAPEParams(posenc.Params):
    num_heads: int
    mlp_width: int = 32
    static: str = "kerple"

    def validate(self) -> None:
        positive_int("num_heads", self.num_heads)
        positive_int("mlp_width", self.mlp_width)
        one_of("static", self.static, ("kerple", "alibi"))


@posenc.register
class DAPE(posenc.PositionalEncoding):
    """DAPE, Data-Adaptive Positional Encoding (Zheng et al. 2024, NeurIPS 2024,
    arXiv:2405.14722): a static relative bias corrected per (query, key) by a small MLP
    over the heads of the attention logits and that bias.

    Formula (the paper's Eq. for A_DAPE, as in the authors' ``DAPE.py``, whose
    ``forward`` returns ``x + a + mlp(cat(x, a))``)::

        S_h(i, j) = q_h,i · k_h,j / sqrt(d)                        the logits, h = 1..H
        B_h(i, j) = static bias: KERPLE log -r1_h log(1 + r2_h |i - j|) (default)
                    or ALiBi -m_h (i - j)
        f(s, b)   = W2 LeakyReLU(W1 [s; b] + c1) + c2              R^{2H} -> R^H, hidden mlp_width
        logits_h(i, j) = S_h(i, j) + B_h(i, j) + f(S(i, j), B(i, j))_h

    ``bias()`` returns ``B + f(S, B)`` ``[b, h, s_q, s_k]`` (the attention adds ``S``).
    ``f`` mixes the heads of one (i, j) entry only, so entry (i, j) depends on q_i, k_j
    and the positions alone: causal and exact under a KV cache. Both inputs of ``f``
    depend on positions only through ``i - j``, so DAPE is translation invariant.

    Parameters: ``num_heads``; ``mlp_width`` (D_DAPE, the hidden width; 32 as in the
    authors' default); ``static``: ``kerple`` (the paper's main variant, DAPE-Kerple) or
    ``alibi``. The static bias is posenc's own ``kerple``/``alibi`` module (KERPLE's r1,
    r2 learned). Initialisation is PyTorch's default for both linear layers, as in the
    authors' code, so a fresh DAPE does not start as its static bias.

    Unsure details, stated: the logits fed to ``f`` here are the scaled ``q·k/sqrt(d)``
    before the causal mask (in the authors' GPT-NeoX code the bias module receives the
    scaled scores before masking too, as far as we read it); the paper also studies
    other static biases (FIRE) and variants not reproduced here. ``k`` with fewer heads
    (grouped-query attention) is repeated to ``H`` heads before the logits.

    Needs the content (``needs_content``): ``bias(..., q=q, k=k)``. No FlexAttention form:
    ``f`` mixes all heads of an entry, a ``score_mod`` sees one head's score at a time.
    """

    name = "dape"
    family = "contextual"
    reference = "Zheng et al. 2024, DAPE: Data-Adaptive Positional Encoding for Length Extrapolation (NeurIPS 2024)"
    formula = "logits = S + B + MLP([S; B]) over heads, S = q k^T / sqrt(d), B = KERPLE (or ALiBi) bias"
    flaw = "O(s^2 * mlp_width) extra work and memory per layer; no fused-kernel (flex) form"
    translation_invariant = True
    CHUNK_ELEMENTS = 2**24  # the most hidden-layer floats f holds at once (64 MB in float32)
    Params: ClassVar[type[posenc.Params]] = DAPEParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        p = self.params
        self.static = posenc.create(p.static, num_heads=p.num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(2 * p.num_heads, p.mlp_width), nn.LeakyReLU(), nn.Linear(p.mlp_width, p.num_heads)
        )

    @property
    def needs_content(self) -> bool:
        return True

    def bias(self, q_positions, k_positions, *, q=None, k=None) -> torch.Tensor:
        """``B + f(S, B)`` ``[b, h, s_q, s_k]`` from ``q [b, h, s_q, d]``, ``k [b, h_kv, s_k, d]``."""
        check_positions(q_positions, "q_positions")
        check_positions(k_positions, "k_positions")
        if q is None or k is None:
            raise ValueError("dape needs the content: call bias(q_positions, k_positions, q=q, k=k)")
        h = self.params.num_heads
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] != h or h % k.shape[1] or q.shape[0] != k.shape[0]:
            raise ValueError(
                f"dape expects q [b, {h}, s_q, d] and k [b, h_kv, s_k, d], got {tuple(q.shape)}, {tuple(k.shape)}"
            )
        if q_positions.shape[-1] != q.shape[2] or k_positions.shape[-1] != k.shape[2]:
            raise ValueError(
                f"dape got {q.shape[2]} queries / {k.shape[2]} keys but positions of length "
                f"{q_positions.shape[-1]} / {k_positions.shape[-1]}"
            )
        k = k.repeat_interleave(h // k.shape[1], dim=1)  # grouped-query attention: [b, h, s_k, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # S [b, h, s_q, s_k]
        static = self.static.bias(q_positions, k_positions)  # B [h, s_q, s_k] or [b, h, s_q, s_k]
        static = static.to(scores.dtype).expand_as(scores)
        # f over chunks of query rows: the hidden layer holds b x rows x s_k x mlp_width floats,
        # bounded by CHUNK_ELEMENTS (evaluating 1024 tokens at once would otherwise take GBs).
        b, _, s_q, s_k = scores.shape
        rows = max(1, self.CHUNK_ELEMENTS // (b * s_k * self.params.mlp_width))
        mixed = torch.cat(
            [self._mix(scores[:, :, i : i + rows], static[:, :, i : i + rows]) for i in range(0, s_q, rows)], dim=2
        )
        return static + mixed

    def _mix(self, scores: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """``f(S, B)`` ``[b, h, rows, s_k]``: the MLP over the heads of each entry."""
        features = torch.cat([scores, static], dim=1).permute(0, 2, 3, 1)  # [b, rows, s_k, 2h]
        weight = self.mlp[0].weight
        return self.mlp(features.to(weight.dtype)).permute(0, 3, 1, 2).to(scores.dtype)

    def score_mod(self, q_positions, k_positions, *, q=None, k=None):
        raise NotImplementedError(
            "dape cannot run on backend='flex': its MLP mixes the logits of all heads of an entry, and a "
            "FlexAttention score_mod sees one head's score at a time; use backend='sdpa'"
        )
