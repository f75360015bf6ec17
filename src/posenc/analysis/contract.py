"""The encoding contract as executable checks: what every positional encoding, built in
or plugged in, must do for posenc's attention, model and KV cache to be right.

``check_encoding(name_or_class)`` builds the encoding at small sizes and returns one
``CheckResult`` per check (``CHECKS``), each with the failing example when it fails:

* ``construct``: ``Params`` is a frozen dataclass; an unknown parameter is a
  ``TypeError`` that names it; a size parameter of 0 is refused with an error naming it.
* ``hooks``: ``embed`` keeps ``x [b, s, dim]``'s shape and dtype; ``rotate`` keeps
  ``q [b, h, s_q, d]`` and ``k [b, h_kv, s_k, d]``; ``bias`` is ``None``,
  ``[h, s_q, s_k]`` or ``[b, h, s_q, s_k]``; all finite.
* ``causality``: in a causal ``Transformer``, appending tokens changes no logit of an
  earlier position (no prediction sees a later token), for every prefix of a 12-token
  sequence (a rule that switches at some length is caught wherever it switches).
* ``kv_cache``: prefill then one token at a time gives, at every step, the logits of a
  full forward over the same prefix.
* ``translation``: for an encoding whose class sets ``translation_invariant = True``,
  the attention scores ``q'k'^T + bias`` are unchanged when every position shifts by the
  same offset.
* ``long_positions``: hooks at positions near 2^16 are finite, or refused with a
  ``ValueError`` (e.g. ``learned`` past ``max_len``), never another exception.
* ``score_mod``: FlexAttention's ``score_mod`` adds the same scores as ``bias`` (checked
  with eager ``flex_attention`` against SDPA), or refuses with ``NotImplementedError``.

The contract itself: docs/architecture.md ("The encoding contract"); the checks run over
the whole registry in tests/test_contract.py and for any encoding with ``posenc check``.
"""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from posenc.base import PositionalEncoding
from posenc.model import Transformer, TransformerConfig
from posenc.registry import get

CHECKS = ("construct", "hooks", "causality", "kv_cache", "translation", "long_positions", "score_mod")
SIZE_PARAMETERS = ("dim", "num_heads", "head_dim", "max_len")
#: Sizes of the checks: model width, heads, key/value heads, layers, vocabulary.
DIM, HEADS, KV_HEADS, LAYERS, VOCAB = 32, 4, 2, 2, 40
#: Float32 rounding allowed between two computations of the same logits.
ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check of one encoding: ``passed`` and, when it failed, the failing example."""

    check: str
    passed: bool
    detail: str


def _build(cls: type[PositionalEncoding], **overrides) -> PositionalEncoding:
    """``cls`` with its ``example_params`` and the check sizes it declares, built as a
    causal ``Transformer`` builds it (``causal=True`` where the encoding takes it)."""
    sizes = dict(dim=DIM, num_heads=HEADS, head_dim=DIM // HEADS, max_len=64, causal=True)
    accepted = [f.name for f in dataclasses.fields(cls.Params)]
    params = dict(cls.example_params)
    params.update({k: v for k, v in sizes.items() if k in accepted and k not in params})
    return cls(**{**params, **overrides})


def _model(cls: type[PositionalEncoding], seed: int) -> Transformer:
    torch.manual_seed(seed)
    pe = _build(cls)
    config = TransformerConfig(vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, encoding="none")
    model = Transformer(config, pe=pe).eval()
    with torch.no_grad():  # untrained zero-initialized tables would hide a position signal
        for param in pe.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def check_construct(cls: type[PositionalEncoding], seed: int) -> str | None:
    pe = _build(cls)
    if not dataclasses.is_dataclass(pe.params) or not type(pe.params).__dataclass_params__.frozen:
        return f"{type(pe.params).__name__} is not a frozen dataclass"
    try:
        _build(cls, not_a_parameter_of_posenc=1)
    except TypeError as err:
        if "not_a_parameter_of_posenc" not in str(err):
            return f"the TypeError for an unknown parameter does not name it: {err}"
    else:
        return "an unknown parameter 'not_a_parameter_of_posenc' was accepted"
    for size in SIZE_PARAMETERS:
        if size not in [f.name for f in dataclasses.fields(cls.Params)]:
            continue
        try:
            _build(cls, **{size: 0})
        except (TypeError, ValueError) as err:
            if size not in str(err):
                return f"the error for {size}=0 does not name {size!r}: {err}"
        else:
            return f"{size}=0 was accepted"
    return None


def _finite(name: str, value: torch.Tensor) -> str | None:
    return None if bool(torch.isfinite(value).all()) else f"{name} has non-finite values"


def _hooks_at(pe: PositionalEncoding, start: int) -> str | None:
    """Call the three hooks at positions ``start..``; a failure message or ``None``."""
    b, s_q, s_k, d = 2, 5, 7, DIM // HEADS
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, s_q, DIM, generator=gen)
    q = torch.randn(b, HEADS, s_q, d, generator=gen)
    k = torch.randn(b, KV_HEADS, s_k, d, generator=gen)
    k_positions = torch.arange(start, start + s_k)
    q_positions = k_positions[-s_q:]
    with torch.no_grad():
        out = pe.embed(x, q_positions)
        if out.shape != x.shape or out.dtype != x.dtype:
            return f"embed: x {tuple(x.shape)} {x.dtype} -> {tuple(out.shape)} {out.dtype}"
        q2, k2 = pe.rotate(q, k, q_positions, k_positions)
        if q2.shape != q.shape or k2.shape != k.shape or q2.dtype != q.dtype or k2.dtype != k.dtype:
            return f"rotate: q {tuple(q.shape)}, k {tuple(k.shape)} -> q {tuple(q2.shape)}, k {tuple(k2.shape)}"
        bias = pe.bias(q_positions, k_positions, q=q, k=k)
        if bias is not None and bias.shape not in ((HEADS, s_q, s_k), (b, HEADS, s_q, s_k), (1, HEADS, s_q, s_k)):
            return f"bias: expected [h, s_q, s_k] = {(HEADS, s_q, s_k)} or [b, h, s_q, s_k], got {tuple(bias.shape)}"
        for name, value in (("embed", out), ("rotate q", q2), ("rotate k", k2), ("bias", bias)):
            if value is not None and (problem := _finite(name, value)):
                return f"{problem} at positions {start}..{start + s_k - 1}"
    return None


def check_hooks(cls: type[PositionalEncoding], seed: int) -> str | None:
    return _hooks_at(_build(cls), 0)


def check_long_positions(cls: type[PositionalEncoding], seed: int) -> str | None:
    try:
        return _hooks_at(_build(cls), 2**16)
    except ValueError:
        return None  # a clear refusal (e.g. learned past max_len) is allowed


def check_causality(cls: type[PositionalEncoding], seed: int) -> str | None:
    model = _model(cls, seed)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)  # [2, 12, vocab]
        for n in (8, *range(1, 8), *range(9, 12)):  # every prefix, the 8-token one first
            diff = (model(tokens[:, :n]) - full[:, :n]).abs().amax(dim=(0, 2))  # [n]
            if float(diff.max()) > ATOL:
                i = int(diff.argmax())
                return f"appending {12 - n} tokens to {n} changed the logits at position {i} by {float(diff[i]):.3g}"
    return None


def check_kv_cache(cls: type[PositionalEncoding], seed: int) -> str | None:
    model = _model(cls, seed)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cache = model.new_cache()
        model(tokens[:, :3], cache=cache)
        for t in range(3, tokens.shape[1]):
            step = model(tokens[:, t : t + 1], cache=cache)[:, 0]  # [b, vocab]
            full = model(tokens[:, : t + 1])[:, -1]
            diff = float((step - full).abs().max())
            if diff > ATOL:
                return f"decoding token {t} with the cache differs from the full forward by {diff:.3g}"
    return None


def _scores(pe: PositionalEncoding, q, k, q_positions, k_positions) -> torch.Tensor:
    """``q'k'^T / sqrt(d) + bias`` ``[b, h, s_q, s_k]`` through the hooks."""
    q2, k2 = pe.rotate(q, k, q_positions, k_positions)
    scores = q2 @ k2.transpose(-1, -2) / q.shape[-1] ** 0.5
    bias = pe.bias(q_positions, k_positions, q=q, k=k)
    return scores if bias is None else scores + bias


def check_translation(cls: type[PositionalEncoding], seed: int) -> str | None:
    pe = _build(cls)
    if not getattr(pe, "translation_invariant", False):
        return None
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, 6, DIM // HEADS, generator=gen)
    k = torch.randn(2, HEADS, 6, DIM // HEADS, generator=gen)
    positions = torch.arange(6)
    with torch.no_grad():
        base = _scores(pe, q, k, positions, positions)
        for shift in (1, 37, 1000):
            moved = _scores(pe, q, k, positions + shift, positions + shift)
            diff = float((moved - base).abs().max())
            if diff > ATOL:
                return f"shifting every position by {shift} changed the scores by {diff:.3g}"
    return None


def check_score_mod(cls: type[PositionalEncoding], seed: int) -> str | None:
    from torch.nn.attention.flex_attention import flex_attention

    pe = _build(cls)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, 5, DIM // HEADS, generator=gen)
    k, v = (torch.randn(2, HEADS, 7, DIM // HEADS, generator=gen) for _ in range(2))
    k_positions = torch.arange(7)
    q_positions = k_positions[-5:]
    with torch.no_grad():
        try:
            score_mod = pe.score_mod(q_positions, k_positions, q=q, k=k)
        except NotImplementedError:
            return None  # refused clearly: backend="flex" raises for this encoding
        bias = pe.bias(q_positions, k_positions, q=q, k=k)
        if score_mod is None:
            return None if bias is None else "bias() returns a bias but score_mod() returns None"
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
            out = flex_attention(q, k, v, score_mod=score_mod)
    diff = float((out - ref).abs().max())
    return None if diff <= ATOL else f"attention with score_mod differs from attention with bias by {diff:.3g}"


_CHECK_FUNCTIONS: dict[str, Callable[[type[PositionalEncoding], int], str | None]] = {
    "construct": check_construct,
    "hooks": check_hooks,
    "causality": check_causality,
    "kv_cache": check_kv_cache,
    "translation": check_translation,
    "long_positions": check_long_positions,
    "score_mod": check_score_mod,
}


def check_encoding(
    encoding: str | type[PositionalEncoding], *, checks: tuple[str, ...] = CHECKS, seed: int = 0
) -> list[CheckResult]:
    """Run ``checks`` on a registered name or an encoding class; one result per check.
    An exception inside a check is that check's failure (its last traceback line)."""
    cls = get(encoding) if isinstance(encoding, str) else encoding
    if not (isinstance(cls, type) and issubclass(cls, PositionalEncoding)):
        raise TypeError(f"expected an encoding name or a PositionalEncoding subclass, got {encoding!r}")
    unknown = [c for c in checks if c not in _CHECK_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; available: {list(CHECKS)}")
    results = []
    for check in checks:
        try:
            problem = _CHECK_FUNCTIONS[check](cls, seed)
        except Exception as err:  # a crash is a failed check, reported with its cause
            where = traceback.extract_tb(err.__traceback__)[-1]
            problem = f"{type(err).__name__}: {err} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        results.append(CheckResult(check, problem is None, problem or "ok"))
    return results
