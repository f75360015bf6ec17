"""A tiny causal LM trained in seconds on a copy task, so attention maps
(``posenc.analysis.attention``) have something to show.

Shapes: tokens ``[b, s]``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from posenc.functional.checks import positive_int
from posenc.model import Transformer, TransformerConfig


def copy_batch(batch: int, half: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences ``[x_1 .. x_n, x_1 .. x_n]`` of random tokens ``[b, 2 n]``: the second
    half is predictable only by attending ``n`` positions back (an induction/copy head)."""
    first = torch.randint(1, vocab, (batch, half), generator=generator)
    return torch.cat([first, first], dim=1)  # [b, 2n]


def train_tiny(
    encoding: str,
    *,
    steps: int = 150,
    half: int = 16,
    vocab: int = 32,
    dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    encoding_params: dict | None = None,
) -> tuple[Transformer, float]:
    """A tiny causal LM trained ``steps`` Adam steps on :func:`copy_batch` sequences
    (a few seconds on a CPU). Returns the model and its final loss on the copied half."""
    positive_int("steps", steps)
    positive_int("half", half)
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=vocab,
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        encoding=encoding,
        encoding_params=dict(encoding_params or {}),
        max_len=2 * half,
        causal=True,
    )
    model = Transformer(cfg)
    threads = torch.get_num_threads()
    # Matrices this small run fastest on one thread; several threads spin against each other.
    torch.set_num_threads(1)
    try:
        loss = _fit(model, steps, half, vocab, seed)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), loss


def _fit(model: Transformer, steps: int, half: int, vocab: int, seed: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(math.nan)
    model.train()
    for _ in range(steps):
        seq = copy_batch(32, half, vocab, gen)  # [b, 2n]
        logits = model(seq[:, :-1])  # [b, 2n - 1, vocab]
        target = seq[:, 1:]
        # Only the copied half is predictable: score it alone.
        loss = torch.nn.functional.cross_entropy(
            rearrange(logits[:, half - 1 :], "b s v -> (b s) v"), rearrange(target[:, half - 1 :], "b s -> (b s)")
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())
