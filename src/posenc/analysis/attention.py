"""Attention probabilities of a given ``posenc.Transformer`` (SDPA never returns them):
a pure measurement, no training (``posenc.experiments.tiny`` trains models to measure).

Shapes: tokens ``[b, s]``; weights ``[layers, b, h, s, s]`` (rows sum to 1).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat

from posenc.model import Transformer


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
