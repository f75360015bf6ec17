"""Multi-head attention that calls the encoding hooks and never branches on them.

Shapes:
    b batch, s_q queries, s_k keys (cache + new), h query heads, h_kv key/value heads,
    d head_dim, dim model width (= h * d).

Per forward:
    x [b, s_q, dim] -> q [b, h, s_q, d], k/v [b, h_kv, s_q, d]
    keys and values are appended to the cache *before* rotation, so every step rotates
    the whole key sequence with the frequencies of the current length: decoding equals a
    full forward even when an encoding's frequencies depend on the length (dynamic NTK,
    LongRoPE), at the cost of re-rotating cached keys (O(s_k * d) per step, the same
    order as reading them in attention).
    q, k = pe.rotate(q, k, q_positions, k_positions)
    scores = q kᵀ / sqrt(d) + pe.bias(q_positions, k_positions, q=q, k=k) + mask

Evaluation-time interventions (``Intervention``: a sliding window, a temperature, an
observer of the probabilities) change every backend the same way and never branch on
the encoding: the window is a mask, the temperature multiplies the whole score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from numbers import Real

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from posenc.base import PositionalEncoding
from posenc.functional.checks import (
    check_hidden,
    check_positions,
    check_positions_match,
    nonnegative_int,
    one_of,
    positive_int,
)

BACKENDS = ("sdpa", "flex")


@dataclasses.dataclass(frozen=True)
class Intervention:
    """An evaluation-time change of attention, identical for every encoding and backend
    (the mechanism probes of ``posenc.experiments.diagnose``).

    Attributes:
        window: every query attends only to its last ``window`` keys by sequence index,
            itself included: key ``j`` is visible from query ``i`` iff
            ``i - window < j <= i`` (a bidirectional model also needs
            ``j < i + window``). A mask: every query-key distance is below ``window``.
            ``None``: no window.
        temperature: the whole pre-softmax score is multiplied by it,
            ``softmax(temperature * (q kᵀ / sqrt(d) + bias))``: the bias of a bias
            encoding (ALiBi, T5, ...) is scaled with the dot product; masked scores stay
            ``-inf``. SDPA gets ``scale = temperature / sqrt(d)`` and ``temperature *
            bias``; FlexAttention a ``score_mod`` that multiplies the encoding's score.
        offset: added to every position by ``Transformer.forward`` (to the positions it
            is given or to its default ``arange``): the tokens are unchanged. An
            ``Attention`` called directly takes its positions as given.
        observe: ``observe(attention_module, probs)`` with the softmax probabilities
            ``[b, h, s_q, s_k]`` (float32) of every layer it passes; setting it runs
            the explicit path on either backend (scores materialized, softmax,
            ``probs @ v``; ``attention_probabilities``).
    """

    window: int | None = None
    temperature: float = 1.0
    offset: int = 0
    observe: Callable[[nn.Module, torch.Tensor], None] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.window is not None:
            positive_int("window", self.window)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, Real):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (1.0 leaves the scores), got {self.temperature}")
        nonnegative_int("offset", self.offset)
        if self.observe is not None and not callable(self.observe):
            raise TypeError(f"observe must be a callable (module, probs) or None, got {type(self.observe).__name__}")

    @property
    def changes_attention(self) -> bool:
        """Whether the attention itself differs from the default path (the offset is the model's)."""
        return self.window is not None or self.temperature != 1.0 or self.observe is not None


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``softmax(temperature * (q kᵀ / sqrt(d) + bias))`` over the keys visible in ``mask``
    (Vaswani et al. 2017, eq. 1, with a score bias and a temperature), in float32.

    Args:
        q: ``[b, h, s_q, d]``; k: ``[b, h_kv, s_k, d]`` (``h_kv`` divides ``h``: GQA).
        bias: ``[h, s_q, s_k]`` or ``[b|1, h, s_q, s_k]``, or ``None``.
        mask: bool ``[b|1, 1, s_q, s_k]`` (True = attend, ``build_mask``), or ``None``.

    Returns:
        ``[b, h, s_q, s_k]`` float32; each row sums to 1 over its visible keys.
    """
    if q.shape[1] != k.shape[1]:
        k = repeat(k, "b g s d -> b (g r) s d", r=q.shape[1] // k.shape[1])  # GQA: [b, h, s_k, d]
    # temperature * q kᵀ / sqrt(d), scaling q ([.., s_q, d]) rather than the scores ([.., s_q, s_k])
    scores = (q.float() * (temperature / math.sqrt(q.shape[-1]))) @ k.float().transpose(-1, -2)  # [b, h, s_q, s_k]
    if bias is not None:
        scores += bias.float() * temperature if temperature != 1.0 else bias.float()
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(-1)


@dataclasses.dataclass
class LayerCache:
    """Keys and values of one attention layer, stored *before* rotation.

    ``k``/``v`` ``[b, h_kv, s, d]``; ``positions`` ``[s]`` or ``[b, s]``; ``padding``
    ``[b, s]`` (True = real token) or ``None``.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    padding: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class KVCache:
    """One ``LayerCache`` per layer: ``Transformer.new_cache()`` builds it.

    With ``exact=True`` the model also keeps the token ids and the encoding's
    ``frequency_state``; when a new step changes that state (the vectors of earlier
    positions change with the length), the model recomputes the whole prefix, so every
    step equals a full forward. ``exact=False`` keeps the stale layers instead (what
    Hugging Face's cache does with dynamic NTK).
    """

    def __init__(self, num_layers: int, *, exact: bool = True) -> None:
        self.layers = [LayerCache() for _ in range(positive_int("num_layers", num_layers))]
        self.exact = bool(exact)
        self.tokens: torch.Tensor | None = None  # [b, s] ids of every cached token
        self.state: object = None
        self.recomputations = 0

    def reset(self) -> None:
        self.layers = [LayerCache() for _ in self.layers]
        self.tokens, self.state = None, None

    @property
    def length(self) -> int:
        return self.layers[0].length

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]


def _cat_positions(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if old.dim() == new.dim():
        if old.dim() == 2 and old.shape[0] != new.shape[0]:
            b = max(old.shape[0], new.shape[0])
            old, new = old.expand(b, -1), new.expand(b, -1)
        return torch.cat([old, new], dim=-1)
    b = old.shape[0] if old.dim() == 2 else new.shape[0]
    return torch.cat([old.expand(b, -1), new.expand(b, -1)], dim=-1)


def default_positions(batch_positions: torch.Tensor | None, seq: int, past: int, device) -> torch.Tensor:
    """``positions`` as given, or ``arange(past, past + seq)`` ``[s]``."""
    if batch_positions is None:
        return torch.arange(past, past + seq, device=device)
    return batch_positions


def key_positions(positions: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
    """Positions of all keys (cached + new) for the queries at ``positions``."""
    if cache is None or cache.positions is None:
        return positions
    return _cat_positions(cache.positions.to(positions.device), positions)


def build_mask(
    batch: int,
    s_q: int,
    s_k: int,
    *,
    causal: bool,
    padding: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask (True = attend) ``[b|1, 1, s_q, s_k]``, or ``None`` when all attend.

    Causality is by sequence index (query i sees keys 0..past+i), not by position
    value, so packed sequences whose positions restart still mask correctly.
    ``window`` (``Intervention.window``) keeps only keys ``j > past + i - window``
    (and ``j < past + i + window`` when not causal).
    Rows with no visible key (left padding) are opened fully: their output is
    ignored, and this keeps SDPA from returning NaN.
    """
    mask = None
    if (causal and not (s_q == 1)) or window is not None:
        past = s_k - s_q
        qi = torch.arange(past, past + s_q, device=device)[:, None]  # [s_q, 1]
        kj = torch.arange(s_k, device=device)[None, :]  # [1, s_k]
        if causal and not (s_q == 1):
            mask = (kj <= qi)[None, None]  # [1, 1, s_q, s_k]
        if window is not None:
            near = qi - kj < window if causal else (qi - kj).abs() < window  # [s_q, s_k]
            mask = near[None, None] if mask is None else mask & near
    if padding is not None:
        pad = padding[:, None, None, :]  # [b, 1, 1, s_k]
        mask = pad if mask is None else mask & pad
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [b, 1, s, s]
        mask = same if mask is None else mask & same
    if mask is not None:
        mask = mask.expand(batch if mask.shape[0] == 1 and batch > 1 else mask.shape[0], -1, -1, -1)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class Attention(nn.Module):
    """Grouped-query self-attention with a KV cache; positions come from ``pe``.

    Args:
        dim: model width; ``dim = num_heads * head_dim``.
        num_heads: query heads ``h``.
        num_kv_heads: key/value heads ``h_kv`` (divides ``num_heads``; default ``h``).
        pe: the positional encoding whose ``rotate`` and ``bias`` hooks are called
            (``embed`` is the model's job). ``None``: no positions (NoPE).
        causal: decoder (True) or bidirectional encoder (False).
        backend: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention`` with
            the materialized ``pe.bias``) or ``"flex"`` (compiled FlexAttention with
            ``pe.score_mod``: no ``[h, s_q, s_k]`` tensor; inference only on CPU, see
            ``posenc.flex``).
        dropout: attention dropout probability (training only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        pe: PositionalEncoding | None = None,
        causal: bool = True,
        backend: str = "sdpa",
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        positive_int("dim", dim)
        positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        if pe is not None and not isinstance(pe, PositionalEncoding):
            raise TypeError(f"pe must be a posenc.PositionalEncoding or None, got {type(pe).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backend = one_of("backend", backend, BACKENDS)
        pe_heads = getattr(getattr(pe, "params", None), "num_heads", None)
        if pe_heads is not None and pe_heads != num_heads:
            raise ValueError(
                f"the encoding was built with num_heads={pe_heads} but the attention has {num_heads} heads"
            )
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.causal = bool(causal)
        self.dropout = dropout
        self.pe = pe
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        cache: LayerCache | None = None,
        padding_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        intervention: Intervention | None = None,
    ) -> torch.Tensor:
        """Attend over ``x [b, s, dim]`` (plus the cache) -> ``[b, s, dim]``.

        Args:
            positions: ``[s]`` or ``[b, s]`` int indices of the new tokens; default
                ``arange(past, past + s)``.
            cache: this layer's ``LayerCache``; updated in place.
            padding_mask: ``[b, s]`` bool, True for real tokens (left padding).
            segment_ids: ``[b, s]`` int document ids for packed sequences (no cache).
            bias: a precomputed ``pe.bias`` shared across layers (the model builds it
                once per forward); computed here when ``None``.
            intervention: an evaluation-time ``Intervention`` (window, temperature,
                observer); its ``offset`` is the caller's (positions are taken as given).
        """
        check_hidden(x, self.dim)
        b, s, _ = x.shape
        past = 0 if cache is None else cache.length
        positions = default_positions(positions, s, past, x.device)
        check_positions(positions)
        check_positions_match(positions, b, s)
        if intervention is not None and not isinstance(intervention, Intervention):
            raise TypeError(f"intervention must be a posenc.attention.Intervention, got {type(intervention).__name__}")
        if intervention is not None and not intervention.changes_attention:
            intervention = None  # the default path, untouched
        if padding_mask is not None:
            padding_mask = _check_bool_mask(padding_mask, b, s, "padding_mask")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            check_positions(segment_ids, "segment_ids")
            if segment_ids.shape != (b, s):
                raise ValueError(f"segment_ids must have shape {(b, s)}, got {tuple(segment_ids.shape)}")

        q = rearrange(self.q_proj(x), "b s (h d) -> b h s d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b s (h d) -> b h s d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b s (h d) -> b h s d", h=self.num_kv_heads)

        k_positions = key_positions(positions, cache)
        padding = padding_mask
        if cache is not None:
            if cache.length and (cache.k.shape[0] != b):
                raise ValueError(f"cache holds batch size {cache.k.shape[0]}, input has {b}")
            if cache.padding is not None or padding_mask is not None:
                old = cache.padding
                if old is None:
                    old = torch.ones(b, past, dtype=torch.bool, device=x.device)
                new = padding_mask if padding_mask is not None else torch.ones(b, s, dtype=torch.bool, device=x.device)
                padding = torch.cat([old, new], dim=1)  # [b, s_k]
            if cache.length:
                k = torch.cat([cache.k, k], dim=2)  # [b, h_kv, s_k, d]
                v = torch.cat([cache.v, v], dim=2)
            cache.k, cache.v, cache.positions, cache.padding = k, v, k_positions, padding

        observed = intervention is not None and intervention.observe is not None
        if self.backend == "flex" and not observed:
            out = self._attend_flex(
                q, k, v, positions, k_positions, bias, padding, segment_ids, intervention
            )  # [b, h, s, d]
            return self.out_proj(rearrange(out, "b h s d -> b s (h d)"))
        if self.pe is not None:
            q, k = self.pe.rotate(q, k, positions, k_positions)
            if bias is None:
                bias = self.pe.bias(positions, k_positions, q=q, k=k)
        if observed:
            out = self._attend_explicit(q, k, v, bias, padding, segment_ids, intervention)  # [b, h, s, d]
        else:
            out = self._attend(q, k, v, bias, padding, segment_ids, intervention)  # [b, h, s, d]
        return self.out_proj(rearrange(out, "b h s d -> b s (h d)"))

    def _attend(self, q, k, v, bias, padding, segment_ids, intervention=None) -> torch.Tensor:
        b, h, s_q, _ = q.shape
        s_k = k.shape[2]
        gqa = self.num_kv_heads != self.num_heads
        dropout = self.dropout if self.training else 0.0
        window = None if intervention is None else intervention.window
        temperature = 1.0 if intervention is None else intervention.temperature
        # SDPA scales q kᵀ by `scale` (default 1/sqrt(d)); the bias is scaled below.
        scale = None if temperature == 1.0 else temperature / math.sqrt(q.shape[-1])
        plain = bias is None and padding is None and segment_ids is None and window is None
        if plain and (s_q == 1 or not self.causal):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa, scale=scale)
        if plain and s_q == s_k:
            # The kernel's own causal mask: no [s, s] tensor.
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa, scale=scale
            )
        mask = build_mask(
            b,
            s_q,
            s_k,
            causal=self.causal,
            padding=padding,
            segment_ids=segment_ids,
            device=q.device,
            window=window,
        )
        if bias is not None:
            _check_bias(bias, b, h, s_q, s_k)
            attn = bias.to(q.dtype)
            if temperature != 1.0:
                attn = attn * temperature
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
        else:
            attn = mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=dropout, enable_gqa=gqa, scale=scale)

    def _attend_explicit(self, q, k, v, bias, padding, segment_ids, intervention) -> torch.Tensor:
        """The explicit path: ``attention_probabilities`` (handed to
        ``intervention.observe``), then ``probs @ v`` -> ``[b, h, s_q, d]``."""
        b, h, s_q, _ = q.shape
        s_k = k.shape[2]
        if bias is not None:
            _check_bias(bias, b, h, s_q, s_k)
        mask = build_mask(
            b,
            s_q,
            s_k,
            causal=self.causal,
            padding=padding,
            segment_ids=segment_ids,
            device=q.device,
            window=intervention.window,
        )
        probs = attention_probabilities(q, k, bias=bias, mask=mask, temperature=intervention.temperature)
        intervention.observe(self, probs)
        probs = F.dropout(probs, self.dropout, training=self.training)  # [b, h, s_q, s_k]
        if h != self.num_kv_heads:
            v = repeat(v, "b g s d -> b (g r) s d", r=h // self.num_kv_heads)  # GQA: [b, h, s_k, d]
        return (probs @ v.float()).to(v.dtype)

    def _attend_flex(
        self, q, k, v, positions, k_positions, bias, padding, segment_ids, intervention=None
    ) -> torch.Tensor:
        """FlexAttention with ``pe.score_mod`` inside the kernel (see ``posenc.flex``)."""
        from posenc import flex

        parameters = list(self.parameters())
        flex.check_flex_supported(
            q, k, v, parameters=parameters, dropout=self.dropout if self.training else 0.0, bias=bias
        )
        if self.pe is not None:
            q, k = self.pe.rotate(q, k, positions, k_positions)
        b, _, s_q, _ = q.shape
        n_keys = k.shape[2]
        k, v, k_positions = flex.pad_keys(k, v, k_positions, s_q)  # [b, h_kv, s_pad, d]; the mask hides padding
        score_mod = None if self.pe is None else self.pe.score_mod(positions, k_positions, q=q, k=k)
        if intervention is not None and intervention.temperature != 1.0:
            score_mod = flex.temperature_score_mod(score_mod, intervention.temperature, device=q.device)
        mask = flex.block_mask(
            b,
            s_q,
            k.shape[2],
            n_keys=n_keys,
            causal=self.causal,
            padding=padding,
            segment_ids=segment_ids,
            device=q.device,
            window=None if intervention is None else intervention.window,
        )
        return flex.flex_attend(q, k, v, score_mod, mask, gqa=self.num_kv_heads != self.num_heads)


def _check_bias(bias: torch.Tensor, b: int, h: int, s_q: int, s_k: int) -> None:
    ok = bias.shape[-3:] == (h, s_q, s_k) and (bias.dim() == 3 or (bias.dim() == 4 and bias.shape[0] in (1, b)))
    if not ok:
        raise ValueError(
            f"the encoding's bias has shape {tuple(bias.shape)}; attention expects [{h}, {s_q}, {s_k}] "
            f"or [{b}, {h}, {s_q}, {s_k}] (is num_heads of the encoding equal to the attention's?)"
        )


def _check_bool_mask(mask: object, b: int, s: int, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [b, s] (True = real token)")
    if mask.shape != (b, s):
        raise ValueError(f"{name} must have shape {(b, s)}, got {tuple(mask.shape)}")
    return mask
