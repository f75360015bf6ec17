"""posenc's encodings in your own model: a minimal causal self-attention that calls the
three hooks of any registered encoding, with a KV cache.

    python examples/own_attention.py            # prints one line per encoding

Shapes: x [b, s, dim]; q [b, h, s_q, d]; k, v [b, h, s_k, d]; positions [s].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import posenc


class MyAttention(nn.Module):
    """Causal multi-head self-attention; ``pe`` decides how positions enter."""

    def __init__(self, dim: int, num_heads: int, pe: posenc.PositionalEncoding) -> None:
        super().__init__()
        self.num_heads, self.pe = num_heads, pe
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        past = 0 if cache is None or "k" not in cache else cache["k"].shape[2]
        positions = torch.arange(past, past + x.shape[1])  # [s] absolute indices of the new tokens
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.num_heads)
        if cache is not None:  # keep keys *before* rotation: rotate() sees every key with its position
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        k_positions = torch.arange(k.shape[2])  # [s_k]
        q, k = self.pe.rotate(q, k, positions, k_positions)  # rotary encodings; identity otherwise
        mask = positions[:, None] >= k_positions[None, :]  # [s_q, s_k] causal
        bias = self.pe.bias(positions, k_positions, q=q, k=k)  # [h, s_q, s_k] or None
        scores = torch.zeros(mask.shape) if bias is None else bias.to(q.dtype)
        scores = scores.masked_fill(~mask, float("-inf"))  # additive mask, broadcast over b (and h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores)  # [b, h, s_q, d]
        return self.out(rearrange(out, "b h s d -> b s (h d)"))


class MyModel(nn.Module):
    def __init__(self, vocab: int, dim: int, num_heads: int, encoding: str, **params) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        # the size parameters the encoding declares (dim, num_heads, head_dim, max_len) are filled in
        self.pe = posenc.registry.create_for_model(
            encoding, params, dim=dim, num_heads=num_heads, head_dim=dim // num_heads, max_len=256
        )
        self.attention = MyAttention(dim, num_heads, self.pe)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        past = 0 if cache is None or "k" not in cache else cache["k"].shape[2]
        positions = torch.arange(past, past + tokens.shape[1])
        x = self.pe.embed(self.embedding(tokens), positions)  # additive encodings; identity otherwise
        return self.head(self.attention(x, cache))


def main() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (2, 12))
    for encoding in ("sinusoidal", "rope", "alibi", "t5"):
        model = MyModel(100, 64, 4, encoding).eval()
        with torch.no_grad():
            full = model(tokens)  # [2, 12, 100]
            cache: dict = {}
            steps = [model(tokens[:, :4], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(4, 12)]
        gap = (torch.cat(steps, dim=1) - full).abs().max().item()
        print(f"{encoding:10s} logits {tuple(full.shape)}; cached decoding differs from the full forward by {gap:.1e}")
        assert gap < 1e-4, gap


if __name__ == "__main__":
    main()
