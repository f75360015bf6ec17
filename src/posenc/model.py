"""A reference pre-norm Transformer (decoder LM or bidirectional encoder) whose
positional encoding is injected by name or instance and shared by every layer.

Shapes: tokens ``[b, s]`` -> logits ``[b, s, vocab_size]``; hidden ``[b, s, dim]``.

``forward(..., intervention=Intervention(window, temperature, offset))`` evaluates the
same weights under the mechanism probes' interventions (``posenc.attention.Intervention``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from posenc.attention import Attention, Intervention, KVCache, default_positions, key_positions
from posenc.base import PositionalEncoding
from posenc.functional.checks import check_positions, check_positions_match, one_of, positive_int
from posenc.registry import create_for_model, get


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Size and encoding of a ``Transformer``; validated on creation.

    ``encoding`` is a registry name; ``encoding_params`` its parameters, with the size
    parameters it declares (``dim``, ``num_heads``, ``head_dim``, ``max_len``) filled
    from this config when not given.
    """

    vocab_size: int
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    causal: bool = True
    encoding: str = "rope"
    encoding_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_len: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool = True
    embed_scale: float | None = None
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        positive_int("vocab_size", self.vocab_size)
        positive_int("dim", self.dim)
        positive_int("num_layers", self.num_layers)
        positive_int("num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            positive_int("num_kv_heads", self.num_kv_heads)
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % (self.num_kv_heads or self.num_heads):
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.max_len is not None:
            positive_int("max_len", self.max_len)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.encoding_params, dict):
            raise TypeError(f"encoding_params must be a dict, got {type(self.encoding_params).__name__}")
        get(self.encoding)  # unknown names fail here, listing the valid ones
        one_of("backend", self.backend, ("sdpa", "flex"))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def build_encoding(self) -> PositionalEncoding:
        return create_for_model(
            self.encoding,
            self.encoding_params,
            dim=self.dim,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            max_len=self.max_len,
            causal=self.causal,
        )


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(nn.functional.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, pe: PositionalEncoding) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.dim)
        self.attn = Attention(
            config.dim,
            config.num_heads,
            num_kv_heads=config.num_kv_heads,
            pe=pe,
            causal=config.causal,
            backend=config.backend,
            dropout=config.dropout,
        )
        self.norm2 = nn.RMSNorm(config.dim)
        self.mlp = MLP(config.dim, int(config.mlp_ratio * config.dim), config.dropout)

    def forward(self, x, positions, *, cache, padding_mask, segment_ids, bias, intervention=None):
        x = x + self.attn(
            self.norm1(x),
            positions,
            cache=cache,
            padding_mask=padding_mask,
            segment_ids=segment_ids,
            bias=bias,
            intervention=intervention,
        )
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Decoder LM (``causal=True``) or bidirectional encoder over token ids.

    Args:
        config: sizes and the encoding name.
        pe: an encoding instance to use instead of ``config.encoding`` (shared by
            every layer; its sizes must match the config).

    Example:
        >>> cfg = TransformerConfig(vocab_size=100, encoding="sinusoidal")
        >>> logits = Transformer(cfg)(torch.randint(0, 100, (2, 16)))  # [2, 16, 100]
    """

    def __init__(self, config: TransformerConfig, pe: PositionalEncoding | None = None) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if pe is not None and not isinstance(pe, PositionalEncoding):
            raise TypeError(f"pe must be a posenc.PositionalEncoding, got {type(pe).__name__}")
        self.config = config
        self.pe = pe if pe is not None else config.build_encoding()
        self.embed_scale = config.embed_scale if config.embed_scale is not None else math.sqrt(config.dim)
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, self.pe) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self, *, exact: bool = True) -> KVCache:
        """An empty KV cache for incremental decoding (see ``KVCache`` for ``exact``)."""
        return KVCache(self.config.num_layers, exact=exact)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        check_tokens: bool = True,
        intervention: Intervention | None = None,
    ) -> torch.Tensor:
        """Logits ``[b, s, vocab_size]`` (or final hidden states ``[b, s, dim]``).

        Args:
            tokens: ``[b, s]`` int token ids.
            positions: ``[s]`` or ``[b, s]``; default ``arange(past, past + s)``.
            cache: a ``KVCache`` from ``new_cache()``, updated in place.
            padding_mask: ``[b, s]`` bool, True for real tokens.
            segment_ids: ``[b, s]`` document ids of packed sequences.
            check_tokens: check that every id is in ``[0, vocab_size)`` (reads the
                values: a host sync, and no graph can be traced through it); the fast
                training step passes False for batches its task built.
            intervention: an evaluation-time ``Intervention``: ``offset`` is added to
                ``positions`` (given or default) before anything reads them; ``window``
                and ``temperature`` go to every layer's attention (``None``: the default
                path, unchanged).
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dim() != 2:
            raise TypeError("tokens must be an integer tensor [b, s]")
        if check_tokens and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(
                f"tokens must be in [0, {self.config.vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]"
            )
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (model.new_cache()), got {type(cache).__name__}")
        b, s = tokens.shape
        past = 0 if cache is None else cache.length
        positions = default_positions(positions, s, past, tokens.device)
        if intervention is not None:
            if not isinstance(intervention, Intervention):
                raise TypeError(
                    f"intervention must be a posenc.attention.Intervention, got {type(intervention).__name__}"
                )
            if intervention.offset:
                positions = positions + intervention.offset  # [s] or [b, s], same shape
            intervention = dataclasses.replace(intervention, offset=0) if intervention.changes_attention else None
        check_positions(positions)
        check_positions_match(positions, b, s)

        if cache is not None and self.pe.length_dependent:
            k_positions = key_positions(positions, cache[0])
            state = self.pe.frequency_state(int(k_positions.max()) + 1 if k_positions.numel() else 0)
            if cache.exact and cache.length and state != cache.state:
                return self._recompute(tokens, k_positions, cache, padding_mask, return_hidden, intervention)
            cache.state = state
        if cache is not None and cache.exact:
            cache.tokens = tokens if cache.tokens is None else torch.cat([cache.tokens, tokens], dim=1)

        x = self.tok_emb(tokens) * self.embed_scale  # [b, s, dim]
        x = self.drop(self.pe.embed(x, positions))
        # A bias that does not read q/k is built once and shared by every layer; the
        # flex backend never materializes it (each layer calls pe.score_mod instead).
        bias = None
        if not self.pe.needs_content and self.config.backend != "flex":
            k_positions = key_positions(positions, None if cache is None else cache[0])
            bias = self.pe.bias(positions, k_positions)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                positions,
                cache=None if cache is None else cache[i],
                padding_mask=padding_mask,
                segment_ids=segment_ids,
                bias=bias,
                intervention=intervention,
            )
        x = self.norm(x)
        return x if return_hidden else self.head(x)

    def _recompute(self, tokens, k_positions, cache, padding_mask, return_hidden, intervention) -> torch.Tensor:
        """The encoding's vectors for earlier positions changed with the length: run the
        whole prefix again into a fresh cache and return the new tokens' outputs."""
        s = tokens.shape[1]
        all_tokens = torch.cat([cache.tokens, tokens], dim=1)  # [b, past + s]
        padding = cache[0].padding
        if padding is not None or padding_mask is not None:
            b, past = all_tokens.shape[0], cache.length
            old = padding if padding is not None else torch.ones(b, past, dtype=torch.bool, device=tokens.device)
            new = padding_mask if padding_mask is not None else torch.ones(b, s, dtype=torch.bool, device=tokens.device)
            padding = torch.cat([old, new], dim=1)
        recomputations = cache.recomputations + 1
        cache.reset()
        cache.recomputations = recomputations
        out = self.forward(
            all_tokens,
            k_positions,
            cache=cache,
            padding_mask=padding,
            return_hidden=return_hidden,
            intervention=intervention,  # its offset is already in k_positions
        )
        return out[:, -s:]
