"""The rotary family: RoPE (both layouts, partial rotary, every scaling rule), xPos,
p-RoPE and axial 2-D RoPE for image patches.

Shapes: q ``[b, h, s_q, d]``, k ``[b, h_kv, s_k, d]``, positions ``[s]`` or ``[b, s]``
(int), cos/sin ``[s, r/2]`` or ``[b, s, r/2]`` (one per rotated pair), ``r`` = rotary dim.

Precision: frequencies (``inv_freq``, float64) and the cos/sin tables (float32, built
in float64 and cast once) are non-persistent buffers that ``model.to(torch.bfloat16)``
does not downcast (``_apply`` is overridden); float64 activations get float64 cos/sin.

Length-dependent scaling (``dynamic``, ``longrope``): the frequencies of a call are those
of the total length ``L = max(k_positions) + 1``, and posenc's ``Attention`` re-rotates
the whole (unrotated) key cache every step, so decoding equals a full forward.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from posenc.base import Params, PositionalEncoding
from posenc.functional import rope
from posenc.functional.checks import (
    check_positions,
    check_positions_match,
    check_qk,
    one_of,
    positive_float,
    positive_int,
)
from posenc.functional.rope_fast import apply_rotary
from posenc.functional.rope_scaling import RopeConfig, canonical_rope_type, frequencies, parse_rope_parameters
from posenc.registry import register

#: Positions below this get a cached cos/sin table; larger ones are computed directly
#: (also exactly, in float64), so a huge position never allocates a huge table.
TABLE_CAP = 1 << 16
_MIN_TABLE = 256


class _Rotary(PositionalEncoding):
    """Shared machinery: frequencies by length, exact cos/sin tables, dtype-safe buffers.

    Subclasses set ``self.cfg`` (a :class:`RopeConfig`) via ``rope_config()``.
    """

    family = "rotary"
    translation_invariant = True  # q_m . k_n depends on m - n; rope2d (grid positions) overrides
    _EXACT = ("inv_freq", "long_inv_freq", "main_cos", "main_sin", "long_cos", "long_sin")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.cfg: RopeConfig = self.rope_config()
        self.layout: str = self.params.layout
        self.length_dependent = self.cfg.length_dependent
        # q'k' depends on m - n only while the frequencies do not depend on the length
        self.translation_invariant = type(self).translation_invariant and not self.cfg.length_dependent
        self._build(torch.device("cpu"))

    def rope_config(self) -> RopeConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- buffers ----------------------------------------------------------------------
    def _build(self, device: torch.device) -> None:
        inv_freq, self.attention_factor = frequencies(self.cfg, None, device)  # [r/2] float64
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        empty = torch.empty(0, self.cfg.rotary_dim // 2, dtype=torch.float32, device=device)
        self.register_buffer("main_cos", empty, persistent=False)
        self.register_buffer("main_sin", empty.clone(), persistent=False)
        if self.cfg.one_long_set:  # LongRoPE: one more set past the threshold, cached like the main one
            past = self.cfg.length_threshold + 1
            self.register_buffer("long_inv_freq", frequencies(self.cfg, past, device)[0], persistent=False)
            self.register_buffer("long_cos", empty.clone(), persistent=False)
            self.register_buffer("long_sin", empty.clone(), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Keep the exact buffers out of dtype casts (model.to(bfloat16) / .half()):
        # only follow the device, rebuilding from the parameters when it changes.
        kept = {n: self._buffers.pop(n) for n in self._EXACT if n in self._buffers}
        super()._apply(fn, recurse)
        old = kept["inv_freq"]
        device = fn(torch.empty(0, dtype=old.dtype, device=old.device)).device
        if device == old.device:
            self._buffers.update(kept)
        else:
            self._build(device)
        return self

    # -- frequencies and cos/sin ------------------------------------------------------
    def frequencies_for_length(self, length: int) -> tuple[str | None, torch.Tensor, float]:
        """``(table key, inv_freq [r/2] float64, attention_factor)`` for total length
        ``length``; key ``None`` means the frequencies are specific to this length."""
        cfg = self.cfg
        if cfg.length_dependent and length > cfg.length_threshold:
            if cfg.one_long_set:
                return "long", self.long_inv_freq, self.attention_factor
            inv_freq, af = frequencies(cfg, length, self.inv_freq.device)
            return None, inv_freq, af
        return "main", self.inv_freq, self.attention_factor

    def frequency_state(self, length: int):
        key, _, _ = self.frequencies_for_length(length)
        return ("length", length) if key is None else key

    def _table(self, key: str, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = getattr(self, f"{key}_cos"), getattr(self, f"{key}_sin")
        if cos.shape[0] <= top:
            n = min(TABLE_CAP, max(_MIN_TABLE, 1 << top.bit_length()))
            inv_freq = self.inv_freq if key == "main" else self.long_inv_freq
            positions = torch.arange(n, device=inv_freq.device)
            cos, sin = rope.rope_cos_sin(positions, inv_freq, self.attention_factor)  # [n, r/2] float32
            setattr(self, f"{key}_cos", cos)
            setattr(self, f"{key}_sin", sin)
        return cos, sin

    def cos_sin(
        self, positions: torch.Tensor, length: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (times the attention factor) at ``positions``, for total length
        ``length`` (default ``max(positions) + 1``).

        float32/bf16/fp16 callers get the float32 table (exact: built in float64, cast
        once); ``dtype=torch.float64`` computes float64 values directly.

        Shapes: positions ``[...]`` -> cos, sin ``[..., r/2]`` (float32 or float64).
        """
        check_positions(positions)
        if positions.numel() == 0:
            empty = torch.empty(*positions.shape, self.cfg.rotary_dim // 2, dtype=dtype, device=positions.device)
            return empty, empty.clone()
        top = int(positions.max())
        length = top + 1 if length is None else int(length)
        key, inv_freq, af = self.frequencies_for_length(length)
        device = positions.device
        positions = positions.to(inv_freq.device)
        if dtype == torch.float64 or key is None or top >= TABLE_CAP:
            out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            cos, sin = rope.rope_cos_sin(positions, inv_freq, af, dtype=out_dtype)
        else:
            table_cos, table_sin = self._table(key, top)
            cos, sin = table_cos[positions], table_sin[positions]  # [..., r/2]
        return cos.to(device), sin.to(device)

    def _cache_dtype(self, q: torch.Tensor) -> torch.dtype:
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    def _check(self, q, k, q_positions, k_positions) -> int:
        check_qk(q, k, self.params.head_dim)
        check_positions(q_positions, "q_positions")
        check_positions(k_positions, "k_positions")
        check_positions_match(q_positions, q.shape[0], q.shape[2], "q_positions")
        check_positions_match(k_positions, k.shape[0], k.shape[2], "k_positions")
        tops = [int(p.max()) for p in (q_positions, k_positions) if p.numel()]
        return max(tops) + 1 if tops else 0

    def rotate(self, q, k, q_positions, k_positions):
        """Rotate q ``[b, h, s_q, d]`` and k ``[b, h_kv, s_k, d]`` by their positions.

        Length-dependent rules use ``L = max(q_positions, k_positions) + 1`` for both,
        so ``k_positions`` must cover all keys (the KV cache passes them all).
        """
        length = self._check(q, k, q_positions, k_positions)
        dt = self._cache_dtype(q)
        cq, sq = self.cos_sin(q_positions.to(q.device), length, dt)  # [(b,) s_q, r/2]
        if k_positions is q_positions:  # no cache: one table for both
            ck = sk = None
        else:
            ck, sk = self.cos_sin(k_positions.to(k.device), length, dt)  # [(b,) s_k, r/2]
        # The fast path (functional/rope_fast.py): q and k in one call, compiled per shape.
        return apply_rotary(q, k, cq, sq, k_cos=ck, k_sin=sk, layout=self.layout, rotary_dim=self.cfg.rotary_dim)


# -- rope ------------------------------------------------------------------------------
_FLAT_TO_HF = {
    "base": "rope_theta",
    "rope_type": "rope_type",
    "factor": "factor",
    "original_max_len": "original_max_position_embeddings",
    "partial_rotary_factor": "partial_rotary_factor",
}


_HF_TO_FLAT = {**{key: flat for flat, key in _FLAT_TO_HF.items()}, "max_position_embeddings": "max_len"}


def _config_naming_flat(params: Params) -> RopeConfig:
    """``params.config()``, with errors about a Hugging Face key renamed to the flat
    parameter the user actually passed (``base`` rather than ``rope_theta``)."""
    try:
        return params.config()
    except (ValueError, TypeError) as err:
        msg = str(err)
        for key, flat in _HF_TO_FLAT.items():
            if flat != key and re.search(rf"(?<!\w){key}(?!\w)", msg) and getattr(params, flat, None) is not None:
                raise type(err)(f"{flat}={getattr(params, flat)!r}: {msg}") from None
        raise


@dataclasses.dataclass(frozen=True)
class RoPEParams(Params):
    """RoPE parameters. Scaling can be given flat or as a Hugging Face dict.

    Flat names map to ``rope_parameters`` keys: ``base`` -> ``rope_theta``,
    ``rope_type``, ``factor``, ``original_max_len`` -> ``original_max_position_embeddings``,
    ``partial_rotary_factor``; ``max_len`` is Hugging Face's ``max_position_embeddings``
    (dynamic NTK's threshold). Every other key (``beta_fast``, ``low_freq_factor``,
    ``short_factor``, ...) goes in ``rope_parameters``. A key given both ways must agree.
    """

    head_dim: int
    base: float | None = None
    layout: str = "half"
    rotary_dim: int | None = None
    partial_rotary_factor: float | None = None
    rope_type: str | None = None
    factor: float | None = None
    original_max_len: int | None = None
    max_len: int | None = None
    rope_parameters: dict | None = None

    def validate(self) -> None:
        positive_int("head_dim", self.head_dim)
        one_of("layout", self.layout, rope.LAYOUTS)
        if self.rope_parameters is not None:
            if not isinstance(self.rope_parameters, Mapping):
                raise TypeError(f"rope_parameters must be a dict, got {type(self.rope_parameters).__name__}")
            object.__setattr__(self, "rope_parameters", dict(self.rope_parameters))
        _config_naming_flat(self)

    def hf_parameters(self) -> dict:
        """The merged Hugging Face ``rope_parameters`` dict."""
        merged = dict(self.rope_parameters or {})
        if "type" in merged and "rope_type" not in merged:
            merged["rope_type"] = merged.pop("type")
        for flat, key in _FLAT_TO_HF.items():
            value = getattr(self, flat)
            if value is None:
                continue
            if flat == "rope_type":
                value = canonical_rope_type(value)  # "pi" -> "linear": the table's aliases
            if merged.get(key) is not None and merged[key] != value:
                raise ValueError(f"{flat}={value!r} conflicts with rope_parameters[{key!r}]={merged[key]!r}")
            merged[key] = value
        return merged

    def config(self) -> RopeConfig:
        return parse_rope_parameters(
            self.head_dim, self.hf_parameters(), max_position_embeddings=self.max_len, rotary_dim=self.rotary_dim
        )


@register
class RoPE(_Rotary):
    """Rotary position embedding (Su et al. 2021), with every Hugging Face scaling rule.

    Formula: pair ``i`` of q and k at position ``m`` is rotated by ``m * inv_freq_i``,
    ``inv_freq_i = base ** (-2i / r)`` rescaled by the rule ``rope_type`` (any rope_type
    of ``posenc.functional.SCALING_RULES``, or an alias such as ``"pi"``; see
    ``posenc.rope_frequencies``); cos and sin are multiplied by the rule's attention
    factor. ``<R_m q, R_n k>`` depends only on ``m - n``.

    Layouts: ``"half"`` pairs ``(i, i + r/2)`` (NeoX/Llama ``rotate_half``),
    ``"interleaved"`` pairs ``(2i, 2i + 1)`` (GPT-J, Meta). Partial rotary: only the first
    ``r = rotary_dim`` (or ``int(head_dim * partial_rotary_factor)``) dims rotate.

    Example:
        >>> posenc.create("rope", head_dim=64)
        >>> posenc.create("rope", head_dim=128, base=5e5, rope_type="yarn", factor=4.0,
        ...               original_max_len=8192, rope_parameters={"beta_fast": 32})
    """

    name = "rope"
    reference = "Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding"
    formula = "q_m -> R(m * inv_freq) q_m, k_n -> R(n * inv_freq) k_n; inv_freq_i = base^(-2i/r)"
    flaw = "past the trained length the slow pairs reach angles never seen; needs scaling (PI, NTK, YaRN) to extend"
    Params: ClassVar[type[Params]] = RoPEParams

    def rope_config(self) -> RopeConfig:
        return self.params.config()


@dataclasses.dataclass(frozen=True)
class ProportionalParams(Params):
    head_dim: int
    partial_rotary_factor: float = 0.75
    base: float = 10000.0
    layout: str = "half"
    factor: float = 1.0

    def validate(self) -> None:
        if positive_int("head_dim", self.head_dim) % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        one_of("layout", self.layout, rope.LAYOUTS)
        _config_naming_flat(self)

    def config(self) -> RopeConfig:
        return parse_rope_parameters(
            self.head_dim,
            {
                "rope_type": "proportional",
                "rope_theta": self.base,
                "partial_rotary_factor": self.partial_rotary_factor,
                "factor": self.factor,
            },
        )


@register
class Proportional(_Rotary):
    """p-RoPE (Barbero et al. 2024): RoPE on the highest frequencies only.

    Formula: ``inv_freq_i = base ** (-2i / d)`` for ``i < int(p * d // 2)`` and 0 for the
    rest (those pairs carry no position: a semantic, NoPE channel), ``p`` =
    ``partial_rotary_factor``; divided by ``factor``. Equals
    ``create("rope", rope_type="proportional", ...)`` and Hugging Face's proportional rule.
    """

    name = "proportional"
    reference = "Barbero et al. 2024, Round and Round We Go! What makes Rotary Positional Encodings useful?"
    formula = "inv_freq_i = base^(-2i/d) for the first p*d/2 pairs, 0 (no rotation) for the lowest frequencies"
    flaw = "fewer positional channels; p is one more hyper-parameter"
    Params: ClassVar[type[Params]] = ProportionalParams

    def rope_config(self) -> RopeConfig:
        return self.params.config()


# -- xpos ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class XPosParams(Params):
    head_dim: int
    base: float = 10000.0
    layout: str = "half"
    scale_base: float = 512.0
    gamma: float = 0.4

    def validate(self) -> None:
        if positive_int("head_dim", self.head_dim) % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        one_of("layout", self.layout, rope.LAYOUTS)
        positive_float("base", self.base, minimum=1.0)
        positive_float("scale_base", self.scale_base)
        positive_float("gamma", self.gamma)


@register
class XPos(_Rotary):
    """xPos (Sun et al. 2022): RoPE times a per-pair exponential decay in ``m - n``.

    Formula: ``q_m -> zeta^(m/B) R(m theta) q_m``, ``k_n -> zeta^(-n/B) R(n theta) k_n``
    with ``zeta_i = (2i/d + gamma) / (1 + gamma)``, ``B = scale_base``, so the score of a
    pair is scaled by ``zeta_i^((m - n)/B)``. Positions are centred on the middle of the
    call's range (scores unchanged) so the factors stay finite; a range wider than the
    dtype allows raises ``ValueError``.

    Flaw: the decay is meant for causal attention; with ``m < n`` (bidirectional) it
    grows instead, and long ranges overflow low-precision dtypes.
    """

    name = "xpos"
    reference = "Sun et al. 2022, A Length-Extrapolatable Transformer"
    formula = "score(m, n) = sum_i zeta_i^((m-n)/B) <R(m theta_i) q, R(n theta_i) k>, zeta_i = (2i/d + g)/(1 + g)"
    flaw = "decay assumes m >= n (causal); factors zeta^(-n/B) overflow without re-centring"
    Params: ClassVar[type[Params]] = XPosParams

    def rope_config(self) -> RopeConfig:
        return parse_rope_parameters(self.params.head_dim, {"rope_theta": self.params.base})

    def rotate(self, q, k, q_positions, k_positions):
        length = self._check(q, k, q_positions, k_positions)
        p = self.params
        dt = self._cache_dtype(q)
        zeta = rope.xpos_zeta(self.cfg.rotary_dim, p.gamma, device=q.device)  # [d/2]
        lo = min(int(t.min()) for t in (q_positions, k_positions) if t.numel()) if length else 0
        center = (lo + length - 1) / 2
        span = max(length - 1 - center, center - lo)
        limit = rope.xpos_max_span(float(zeta[0]), p.scale_base, q.dtype)
        if span > limit:
            raise ValueError(
                f"xpos: positions span {lo}..{length - 1}, too wide for {q.dtype} (max half-range {limit:.0f} "
                f"with scale_base={p.scale_base}); use a wider dtype or a larger scale_base"
            )
        tables = []
        for x, pos, up in ((q, q_positions, True), (k, k_positions, False)):
            pos = pos.to(x.device)
            c, s = self.cos_sin(pos, length, dt)  # [(b,) s, d/2]
            scale_q, scale_k = rope.xpos_scales(pos, zeta, p.scale_base, center)
            scale = (scale_q if up else scale_k).to(dt)
            tables.append((c * scale, s * scale))  # scaled rotation: [(b,) s, d/2] each
        (cq, sq), (ck, sk) = tables
        return apply_rotary(q, k, cq, sq, k_cos=ck, k_sin=sk, layout=self.layout, rotary_dim=self.cfg.rotary_dim)


# -- rope2d ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RoPE2DParams(Params):
    head_dim: int
    grid_width: int
    base: float = 100.0
    layout: str = "half"

    def validate(self) -> None:
        if positive_int("head_dim", self.head_dim) % 4:
            raise ValueError(f"head_dim must be a multiple of 4 (two axes of pairs), got {self.head_dim}")
        positive_int("grid_width", self.grid_width)
        positive_float("base", self.base, minimum=1.0)
        one_of("layout", self.layout, rope.LAYOUTS)


@register
class RoPE2D(_Rotary):
    """Axial 2-D RoPE for image patches (Heo et al. 2024, RoPE-Axial; Fu et al. 2023).

    Formula: the first ``d/2`` dimensions are rotated by the patch row, the last
    ``d/2`` by the column, each as 1-D RoPE over ``d/2`` dims
    (``inv_freq_i = base ** (-2i / (d/2))``). The score depends only on
    ``(row_m - row_n, col_m - col_n)``.

    Positions: the contract's flat indices ``[s]``/``[b, s]`` are patch indices in
    row-major order, mapped to ``(p // grid_width, p % grid_width)`` (``grid_width``
    is required: the number of patch columns); for explicit
    coordinates call ``rotate_coords(q, k, q_coords, k_coords)`` with ``[s, 2]`` or
    ``[b, s, 2]`` (row, column) tensors.
    """

    name = "rope2d"
    translation_invariant = False  # a shift moves tokens across grid rows
    reference = "Heo et al. 2024, Rotary Position Embedding for Vision Transformer (RoPE-Axial)"
    formula = "x[:d/2] rotated by row * inv_freq, x[d/2:] by col * inv_freq, inv_freq_i = base^(-4i/d)"
    flaw = "axial: no mixed (diagonal) frequencies, so diagonal offsets are seen only as row + column"
    Params: ClassVar[type[Params]] = RoPE2DParams
    example_params: ClassVar[dict] = {"grid_width": 4}

    def rope_config(self) -> RopeConfig:
        return parse_rope_parameters(self.params.head_dim // 2, {"rope_theta": self.params.base})

    def rotate(self, q, k, q_positions, k_positions):
        self._check(q, k, q_positions, k_positions)
        w = self.params.grid_width
        return self.rotate_coords(q, k, rope.grid_coords(q_positions, w), rope.grid_coords(k_positions, w))

    def rotate_coords(self, q, k, q_coords, k_coords):
        """Rotate q ``[b, h, s_q, d]``, k ``[b, h_kv, s_k, d]`` by (row, col) coordinates
        ``[s, 2]`` or ``[b, s, 2]`` (non-negative ints)."""
        check_qk(q, k, self.params.head_dim)
        dt = self._cache_dtype(q)
        tables = []
        for x, coords, name in ((q, q_coords, "q_coords"), (k, k_coords, "k_coords")):
            if not isinstance(coords, torch.Tensor) or coords.dim() not in (2, 3) or coords.shape[-1] != 2:
                raise ValueError(f"{name} must be a tensor [s, 2] or [b, s, 2] of (row, col)")
            check_positions(coords.reshape(-1, 2), name)
            check_positions_match(coords[..., 0], x.shape[0], x.shape[2], name)
            coords = coords.to(x.device)
            (row_cos, row_sin), (col_cos, col_sin) = (self.cos_sin(coords[..., axis], None, dt) for axis in (0, 1))
            # [(b,) s, d/4] each -> [(b,) 2s, d/4]: the row table, then the column table, per position
            tables.append([torch.stack(pair, -2).flatten(-3, -2) for pair in ((row_cos, col_cos), (row_sin, col_sin))])
        (cq, sq), (ck, sk) = tables
        # Each head's row half and column half become two consecutive positions of a head of d/2
        # dimensions, so one 1-D rotation of d/2 dimensions (apply_rotary) rotates both axes.
        d = self.params.head_dim

        def halves(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (2, d // 2)).flatten(2, 3)  # [b, h, s, d] -> [b, h, 2s, d/2]

        qr, kr = apply_rotary(
            halves(q), halves(k), cq, sq, k_cos=ck, k_sin=sk, layout=self.layout, rotary_dim=self.cfg.rotary_dim
        )
        return qr.unflatten(2, (q.shape[2], 2)).flatten(-2), kr.unflatten(2, (k.shape[2], 2)).flatten(-2)


__all__ = ["RoPE", "RoPE2D", "Proportional", "XPos", "TABLE_CAP"]
