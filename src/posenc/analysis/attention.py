"""Attention probabilities of a ``posenc.Transformer`` (SDPA never returns them), and a
tiny model trained in seconds on a copy task so the maps have something to show.

Shapes: tokens ``[b, s]``; weights ``[layers, b, h, s, s]`` (rows sum to 1).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat

from posenc.functional.checks import positive_int
from posenc.model import Transformer, TransformerConfig


@torch.no_grad()
def attention_weights(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities of every layer for a full forward over ``tokens``.

    The inputs of each ``Attention`` are captured with forward pre-hooks and the
    probabilities recomputed with the same hooks the layer calls:
    ``softmax(rotate(q) rotate(k)ᵀ / sqrt(d) + bias + mask)``.

    Returns:
        ``[layers, b, h, s, s]`` float32.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a posenc.Transformer, got {type(model).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise TypeError("tokens must be an integer tensor [b, s]")
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def grab(module, args, kwargs):
        captured.append((args[0], kwargs.get("bias")))

    handles = [blk.attn.register_forward_pre_hook(grab, with_kwargs=True) for blk in model.blocks]
    was_training = model.training
    try:
        model.eval()
        model(tokens)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device)
    maps = []
    for blk, (x, bias) in zip(model.blocks, captured, strict=True):
        attn = blk.attn
        q = rearrange(attn.q_proj(x), "b s (h d) -> b h s d", h=attn.num_heads)
        k = rearrange(attn.k_proj(x), "b s (h d) -> b h s d", h=attn.num_kv_heads)
        q, k = attn.pe.rotate(q, k, pos, pos)
        if bias is None:
            bias = attn.pe.bias(pos, pos, q=q, k=k)
        k = repeat(k, "b g s d -> b (g r) s d", r=attn.num_heads // attn.num_kv_heads)  # GQA: [b, h, s, d]
        sc = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # [b, h, s, s]
        if bias is not None:
            sc = sc + bias
        if attn.causal:
            sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device=sc.device).triu(1), float("-inf"))
        maps.append(sc.float().softmax(-1))
    return torch.stack(maps)  # [layers, b, h, s, s]


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
