"""The permutation test on a whole model: a sentence and the same words in another order
through the reference ``posenc.Transformer`` (no training: order blindness is a property
of the architecture, not of the weights).

>>> from posenc.analysis.order import sentence_order
>>> t = sentence_order("none")            # "I go home" and "home go I", no mask
>>> t.same, t.deviation                   # (True, ~1e-7): the same outputs, permuted
"""

from __future__ import annotations

import dataclasses

import torch

from posenc.functional.checks import positive_int
from posenc.model import Transformer, TransformerConfig

#: The example sentence of the story and its reversal.
WORDS: tuple[str, ...] = ("I", "go", "home")
REVERSED: tuple[int, ...] = (2, 1, 0)


@dataclasses.dataclass(frozen=True)
class SentenceOrder:
    """Final hidden states ``[s, dim]`` of ``words`` and of ``words`` reordered by
    ``order`` (``permuted[i]`` is the output at the position of word ``order[i]``).
    ``deviation``: max |outputs(P x) − P outputs(x)| / max |outputs(x)| (0: blind)."""

    encoding: str
    causal: bool
    words: tuple[str, ...]
    order: tuple[int, ...]
    outputs: torch.Tensor  # [s, dim]
    permuted: torch.Tensor  # [s, dim]

    @property
    def deviation(self) -> float:
        diff = (self.permuted - self.outputs[list(self.order)]).abs().max()
        return float(diff / self.outputs.abs().max().clamp_min(1e-30))

    @property
    def same(self) -> bool:
        """The outputs of each word are unchanged by the reordering (to float rounding)."""
        return self.deviation < 1e-5

    @property
    def sentence(self) -> str:
        return " ".join(self.words)

    @property
    def permuted_sentence(self) -> str:
        return " ".join(self.words[i] for i in self.order)


@torch.no_grad()
def sentence_order(
    encoding: str = "none",
    words: tuple[str, ...] = WORDS,
    order: tuple[int, ...] = REVERSED,
    *,
    causal: bool = False,
    dim: int = 16,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> SentenceOrder:
    """Run ``words`` (one token per distinct word) and their reordering through a freshly
    initialized ``Transformer`` with ``encoding`` (seeded: the same weights for both)."""
    positive_int("dim", dim)
    if sorted(order) != list(range(len(words))) or len(words) < 2:
        raise ValueError(f"order must be a permutation of 0..{len(words) - 1}, got {order!r}")
    vocab = sorted(set(words), key=words.index)
    ids = torch.tensor([[vocab.index(w) for w in words]])  # [1, s]
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=len(vocab),
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        encoding=encoding,
        causal=causal,
        max_len=max(len(words), 8),
    )
    model = Transformer(cfg).eval()
    out = model(ids, return_hidden=True)[0].double()  # [s, dim]
    out_perm = model(ids[:, list(order)], return_hidden=True)[0].double()  # [s, dim]
    return SentenceOrder(encoding, causal, tuple(words), tuple(order), out, out_perm)
