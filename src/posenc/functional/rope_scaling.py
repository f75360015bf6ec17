"""RoPE frequencies and the long-context scaling rules, one pure function per rule.

The Hugging Face ``modeling_rope_utils`` style: a registry ``ROPE_FREQUENCY_FUNCTIONS``
of pure functions, one per ``rope_type``, each returning ``(inv_freq, attention_factor)``.
Unlike Hugging Face, every function takes a validated :class:`RopeConfig` (not a whole
model config), and bad input raises instead of logging a warning.

    inv_freq, attention_factor = rope_frequencies(head_dim, rope_parameters,
                                                  max_position_embeddings=..., seq_len=...)

Shapes: ``inv_freq`` is ``[r/2]`` float64, ``r`` the rotary dimension
(``int(head_dim * partial_rotary_factor)``; ``head_dim`` for ``proportional``).
The angle of pair ``i`` at position ``m`` is ``m * inv_freq[i]``; cos and sin are
multiplied by ``attention_factor`` (so scores scale by its square, the YaRN convention).

Values equal transformers' ``ROPE_INIT_FUNCTIONS`` (and the models' default rule) for
the same inputs; transformers computes in float32, posenc in float64, so they agree to
float32 rounding (relative ~1e-7).

References: Su et al. 2021 (RoPE); Chen et al. 2023 (linear position interpolation);
bloc97/emozilla 2023 (dynamic NTK); Peng et al. 2023 (YaRN); Ding et al. 2024
(LongRoPE); Meta 2024 (Llama 3.1 scaling); Barbero et al. 2024 (p-RoPE, proportional).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from numbers import Integral, Real

import torch

DEFAULT_THETA = 10000.0

#: Keys every rope_type accepts.
COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
#: (required, optional) keys of each rope_type, beyond ``COMMON_KEYS``.
TYPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (
        ("original_max_position_embeddings",),
        ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "proportional": ((), ("factor",)),
}
ROPE_TYPES = tuple(TYPE_KEYS)
ALL_KEYS = tuple(sorted(set(COMMON_KEYS).union(*(r + o for r, o in TYPE_KEYS.values()))))
#: rope_types whose frequencies depend on the current sequence length.
LENGTH_DEPENDENT = ("dynamic", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Validated RoPE parameters (build with :func:`parse_rope_parameters`).

    ``rotary_dim`` is the number of rotated dimensions ``r`` (even); ``factor`` is
    resolved (yarn/longrope derive it from ``max_position_embeddings`` when absent).
    Optional keys that were absent stay ``None``.
    """

    rope_type: str
    head_dim: int
    rotary_dim: int
    theta: float = DEFAULT_THETA
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in LENGTH_DEPENDENT


# -- validation ------------------------------------------------------------------------
def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"rope_parameters[{key!r}] must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"rope_parameters[{key!r}] must be finite, got {value!r}")
    return v


def _positive(key: str, value: object) -> float:
    v = _number(key, value)
    if v <= 0:
        raise ValueError(f"rope_parameters[{key!r}] must be > 0, got {value!r}")
    return v


def _at_least_one(key: str, value: object) -> float:
    v = _number(key, value)
    if v < 1.0:
        raise ValueError(f"rope_parameters[{key!r}] must be >= 1 (a factor < 1 shrinks the context), got {value!r}")
    return v


def _int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{key} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
    return int(value)


def _factor_list(key: str, value: object, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, torch.Tensor)):
        raise TypeError(f"rope_parameters[{key!r}] must be a list of numbers, got {type(value).__name__}")
    values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    if len(values) != length:
        raise ValueError(
            f"rope_parameters[{key!r}] must have rotary_dim / 2 = {length} entries (one per frequency), "
            f"got {len(values)}"
        )
    return tuple(_positive(f"{key}[{i}]", v) for i, v in enumerate(values))


def parse_rope_parameters(
    head_dim: int,
    rope_parameters: Mapping | None = None,
    *,
    max_position_embeddings: int | None = None,
    rotary_dim: int | None = None,
) -> RopeConfig:
    """Validate a Hugging Face style ``rope_parameters`` dict into a :class:`RopeConfig`.

    Args:
        head_dim: size of one attention head ``d``.
        rope_parameters: ``{"rope_type": ..., "rope_theta": ..., ...}`` (``None`` or
            ``{}``: default RoPE, theta 10000). The legacy key ``type`` is accepted as
            ``rope_type``. ``None`` values count as absent.
        max_position_embeddings: the model's context length (Hugging Face
            ``config.max_position_embeddings``): the threshold of ``dynamic``, and the
            numerator of the factor ``yarn``/``longrope`` derive when ``factor`` is absent.
        rotary_dim: rotate exactly this many dimensions (instead of
            ``int(head_dim * partial_rotary_factor)``); not allowed with ``proportional``.

    Raises:
        TypeError/ValueError naming the key: unknown keys or rope_types, keys the
        rope_type does not use, missing required keys, wrong types, bad values.
    """
    head_dim = _int("head_dim", head_dim)
    if rope_parameters is None:
        rope_parameters = {}
    if not isinstance(rope_parameters, Mapping):
        raise TypeError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    if max_position_embeddings is not None:
        max_position_embeddings = _int("max_position_embeddings", max_position_embeddings)
    raw = {k: v for k, v in rope_parameters.items() if v is not None}
    for key in raw:
        if not isinstance(key, str) or key not in ALL_KEYS:
            raise ValueError(
                f"rope_parameters has unknown key {key!r}; valid keys: {list(ALL_KEYS)}.{_suggest(str(key), ALL_KEYS)}"
            )
    if "type" in raw and "rope_type" in raw and raw["type"] != raw["rope_type"]:
        raise ValueError(f"rope_parameters has rope_type={raw['rope_type']!r} and type={raw['type']!r}; keep one")
    rope_type = raw.pop("rope_type", raw.pop("type", "default"))
    raw.pop("type", None)
    if not isinstance(rope_type, str):
        raise TypeError(f"rope_parameters['rope_type'] must be a str, got {rope_type!r}")
    if rope_type not in TYPE_KEYS:
        raise ValueError(
            f"rope_parameters['rope_type'] {rope_type!r} is not supported; valid: {list(ROPE_TYPES)}."
            f"{_suggest(rope_type, ROPE_TYPES)}"
        )
    required, optional = TYPE_KEYS[rope_type]
    allowed = set(COMMON_KEYS) | set(required) | set(optional)
    for key in raw:
        if key not in allowed:
            hint = ""
            if rope_type == "dynamic" and key == "original_max_position_embeddings":
                hint = "; dynamic's threshold is max_position_embeddings (posenc: max_len)"
            raise ValueError(
                f"rope_parameters key {key!r} is not used by rope_type {rope_type!r} "
                f"(it takes {sorted(allowed - {'type'})}){hint}"
            )
    for key in required:
        if key not in raw:
            raise ValueError(f"rope_parameters for rope_type {rope_type!r} needs key {key!r}")

    theta = _number("rope_theta", raw.get("rope_theta", DEFAULT_THETA))
    if theta <= 1.0:
        raise ValueError(f"rope_parameters['rope_theta'] must be > 1, got {raw['rope_theta']!r}")
    prf = _number("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if rope_type == "proportional":
        if not 0.0 <= prf <= 1.0:
            raise ValueError(f"rope_parameters['partial_rotary_factor'] must be in [0, 1], got {prf!r}")
        if rotary_dim is not None:
            raise ValueError("rotary_dim cannot be combined with rope_type 'proportional' (use partial_rotary_factor)")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rope_type 'proportional', got {head_dim}")
        r = head_dim
    elif rotary_dim is not None:
        if "partial_rotary_factor" in raw:
            raise ValueError("give rotary_dim or partial_rotary_factor, not both")
        r = _int("rotary_dim", rotary_dim)
        if r > head_dim or r % 2:
            raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {r}")
        prf = r / head_dim
    else:
        if not 0.0 < prf <= 1.0:
            raise ValueError(f"rope_parameters['partial_rotary_factor'] must be in (0, 1], got {prf!r}")
        r = int(head_dim * prf)
        if r < 2 or r % 2:
            raise ValueError(
                f"the rotary dimension int(head_dim * partial_rotary_factor) = int({head_dim} * {prf}) = {r} "
                "must be even and >= 2"
            )

    kw: dict = {}
    orig = raw.get("original_max_position_embeddings")
    if orig is not None:
        kw["original_max_position_embeddings"] = _int("rope_parameters['original_max_position_embeddings']", orig)
    factor = raw.get("factor")
    if factor is not None:
        kw["factor"] = _at_least_one("factor", factor)
    elif rope_type in ("yarn", "longrope"):
        # Hugging Face derives the factor from the two lengths (DeepSeek-V3, Phi-3 configs).
        if max_position_embeddings is None:
            raise ValueError(
                f"rope_type {rope_type!r} without 'factor' derives it as max_position_embeddings / "
                "original_max_position_embeddings: give factor or max_position_embeddings"
            )
        derived = max_position_embeddings / kw["original_max_position_embeddings"]
        if derived < 1.0:
            raise ValueError(
                f"derived factor max_position_embeddings / original_max_position_embeddings = "
                f"{max_position_embeddings} / {kw['original_max_position_embeddings']} is < 1"
            )
        kw["factor"] = derived
    if rope_type == "dynamic":
        if max_position_embeddings is None:
            raise ValueError(
                "rope_type 'dynamic' needs max_position_embeddings (posenc: max_len), the length past which the "
                "base grows"
            )
        if r <= 2:
            raise ValueError(f"rope_type 'dynamic' needs a rotary dimension > 2 (exponent r/(r-2)), got {r}")
    if "attention_factor" in raw:
        kw["attention_factor"] = _positive("attention_factor", raw["attention_factor"])
    for key in ("beta_fast", "beta_slow"):
        if key in raw:
            kw[key] = _positive(key, raw[key])
    fast, slow = kw.get("beta_fast", 32.0), kw.get("beta_slow", 1.0)
    if fast < slow:
        raise ValueError(f"rope_parameters['beta_fast'] ({fast}) must be >= beta_slow ({slow})")
    for key in ("mscale", "mscale_all_dim"):
        if key in raw:
            kw[key] = _number(key, raw[key])
            if kw[key] < 0:
                raise ValueError(f"rope_parameters[{key!r}] must be >= 0, got {raw[key]!r}")
    if "truncate" in raw:
        if not isinstance(raw["truncate"], bool):
            raise TypeError(f"rope_parameters['truncate'] must be a bool, got {raw['truncate']!r}")
        kw["truncate"] = raw["truncate"]
    if rope_type == "llama3":
        kw["low_freq_factor"] = _positive("low_freq_factor", raw["low_freq_factor"])
        kw["high_freq_factor"] = _positive("high_freq_factor", raw["high_freq_factor"])
        if kw["high_freq_factor"] <= kw["low_freq_factor"]:
            raise ValueError(
                f"rope_parameters['high_freq_factor'] ({kw['high_freq_factor']}) must be > low_freq_factor "
                f"({kw['low_freq_factor']})"
            )
    if rope_type == "longrope":
        kw["short_factor"] = _factor_list("short_factor", raw["short_factor"], r // 2)
        kw["long_factor"] = _factor_list("long_factor", raw["long_factor"], r // 2)
    return RopeConfig(
        rope_type=rope_type,
        head_dim=head_dim,
        rotary_dim=r,
        theta=theta,
        partial_rotary_factor=prf,
        max_position_embeddings=max_position_embeddings,
        **kw,
    )


# -- the rules -------------------------------------------------------------------------
def _exponents(cfg: RopeConfig, device=None) -> torch.Tensor:
    """``2i / r`` for ``i = 0 .. r/2 - 1`` (float64)."""
    r = cfg.rotary_dim
    return torch.arange(0, r, 2, dtype=torch.float64, device=device) / r  # [r/2]


def default_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Su et al. 2021: ``inv_freq_i = theta ** (-2i / r)``; attention factor 1."""
    return 1.0 / cfg.theta ** _exponents(cfg, device), 1.0


def linear_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023; kaiokendev): ``inv_freq / factor``,
    the same as dividing every position by ``factor``."""
    inv_freq, _ = default_frequencies(cfg, device=device)
    return inv_freq / cfg.factor, 1.0


def dynamic_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (bloc97, emozilla 2023): at length ``L = max(seq_len, M)``, with
    ``M = max_position_embeddings``, the base grows to
    ``theta * (factor * L / M - (factor - 1)) ** (r / (r - 2))``; unchanged up to ``M``."""
    m = cfg.max_position_embeddings
    length = m if seq_len is None else max(int(seq_len), m)
    r = cfg.rotary_dim
    base = cfg.theta * ((cfg.factor * length / m) - (cfg.factor - 1)) ** (r / (r - 2))
    return 1.0 / base ** _exponents(cfg, device), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(cfg: RopeConfig) -> tuple[float, float]:
    """Pair indices ``(low, high)`` between which YaRN ramps from extrapolation to
    interpolation: pair ``i`` completes ``L_orig / (2 pi theta^(2i/r))`` rotations over
    the original context; ``low`` is where that equals ``beta_fast``, ``high``
    where it equals ``beta_slow`` (floored/ceiled when ``truncate``)."""
    r, theta, orig = cfg.rotary_dim, cfg.theta, cfg.original_max_position_embeddings

    def dim_of(rotations: float) -> float:
        return (r * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_of(cfg.beta_fast or 32.0), dim_of(cfg.beta_slow or 1.0)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, r - 1)


def yarn_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): high-frequency pairs (many rotations over the original
    context) keep ``inv_freq`` (extrapolation), low-frequency pairs get
    ``inv_freq / factor`` (interpolation), with a linear ramp between
    :func:`yarn_correction_range`. Attention factor ``attention_factor`` if given, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set
    (DeepSeek), else ``0.1 ln(factor) + 1``."""
    factor = cfg.factor
    attention_factor = cfg.attention_factor
    if attention_factor is None:
        if cfg.mscale and cfg.mscale_all_dim:
            attention_factor = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    inv_extra, _ = default_frequencies(cfg, device=device)  # [r/2]
    inv_inter = inv_extra / factor
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # a one-step ramp, as the reference implementation
    ramp = ((torch.arange(cfg.rotary_dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 for the fast (early) pairs, 0 for the slow ones
    return inv_inter * (1 - extrapolation) + inv_extra * extrapolation, float(attention_factor)


def longrope_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al. 2024; Phi-3): ``inv_freq_i / ext_i`` with ``ext`` =
    ``long_factor`` when ``seq_len > original_max_position_embeddings`` else
    ``short_factor``. Attention factor ``attention_factor`` if given, else
    ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` (1 for factor <= 1)."""
    orig = cfg.original_max_position_embeddings
    attention_factor = cfg.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if cfg.factor <= 1.0 else math.sqrt(1 + math.log(cfg.factor) / math.log(orig))
    ext = cfg.long_factor if seq_len and seq_len > orig else cfg.short_factor
    inv_freq, _ = default_frequencies(cfg, device=device)
    return inv_freq / torch.tensor(ext, dtype=torch.float64, device=device), float(attention_factor)


def llama3_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: wavelengths ``2 pi / inv_freq`` longer than ``L / low_freq_factor``
    are divided by ``factor``, shorter than ``L / high_freq_factor`` kept, and in between
    blended by ``s = (L / wavelen - low) / (high - low)``:
    ``(1 - s) inv_freq / factor + s inv_freq`` (``L`` = original_max_position_embeddings)."""
    inv_freq, _ = default_frequencies(cfg, device=device)
    orig, factor = cfg.original_max_position_embeddings, cfg.factor
    low, high = cfg.low_freq_factor, cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [r/2]
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, blended, scaled), 1.0


def proportional_frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """p-RoPE (Barbero et al. 2024; Gemma): keep the ``int(p * d // 2)`` highest
    frequencies ``theta ** (-2i / d)`` (exponent over the full ``head_dim`` ``d``) and set
    the rest to 0, so those pairs are not rotated (a NoPE channel); then ``/ factor``."""
    d = cfg.head_dim
    angles = int(cfg.partial_rotary_factor * d // 2)
    rotated = 1.0 / cfg.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float64, device=device) / d)
    zeros = torch.zeros(d // 2 - angles, dtype=torch.float64, device=device)
    return torch.cat([rotated, zeros]) / (cfg.factor or 1.0), 1.0


ROPE_FREQUENCY_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": default_frequencies,
    "linear": linear_frequencies,
    "dynamic": dynamic_frequencies,
    "yarn": yarn_frequencies,
    "longrope": longrope_frequencies,
    "llama3": llama3_frequencies,
    "proportional": proportional_frequencies,
}


def frequencies(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [r/2] float64, attention_factor)`` of a validated config at ``seq_len``."""
    if seq_len is not None:
        if isinstance(seq_len, torch.Tensor):
            seq_len = int(seq_len)
        seq_len = _int("seq_len", seq_len)
    return ROPE_FREQUENCY_FUNCTIONS[cfg.rope_type](cfg, seq_len, device)


def rope_frequencies(
    head_dim: int,
    rope_parameters: Mapping | None = None,
    *,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor of any RoPE scaling rule.

    Args:
        head_dim: size of one attention head.
        rope_parameters: the Hugging Face ``config.rope_parameters`` dict (see
            :func:`parse_rope_parameters` for the keys each ``rope_type`` takes).
        max_position_embeddings: Hugging Face ``config.max_position_embeddings``.
        seq_len: current total length; only ``dynamic`` and ``longrope`` read it.
        device: where to build ``inv_freq``.

    Returns:
        ``(inv_freq, attention_factor)``: ``inv_freq`` ``[r/2]`` float64, equal to
        transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)`` up to
        float32 rounding; ``attention_factor`` a float multiplying cos and sin.

    Example:
        >>> inv_freq, af = rope_frequencies(128, {"rope_type": "yarn", "factor": 4.0,
        ...     "original_max_position_embeddings": 4096, "rope_theta": 1e4})
    """
    cfg = parse_rope_parameters(head_dim, rope_parameters, max_position_embeddings=max_position_embeddings)
    return frequencies(cfg, seq_len, device)
