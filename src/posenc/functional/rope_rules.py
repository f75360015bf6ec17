"""What the RoPE scaling rules are made of: the validated config, the checks of each
``rope_parameters`` key and between keys, and the frequency function of every rule.

Each function maps a validated :class:`RopeConfig` (built by
``rope_scaling.parse_rope_parameters``), the current total length ``seq_len`` (only
length-dependent rules read it) and a device to ``(inv_freq [r/2] float64,
attention_factor)``. The table ``rope_scaling.SCALING_RULES`` says which function serves
which ``rope_type``, which keys it takes and how they are checked.

The angle of pair ``i`` at position ``m`` is ``m * inv_freq[i]``; cos and sin are
multiplied by ``attention_factor`` (so scores scale by its square, the YaRN convention).
Values equal transformers' ``ROPE_INIT_FUNCTIONS`` for the same inputs (float64 here,
float32 there).

References: Su et al. 2021 (RoPE); Chen et al. 2023 (linear position interpolation);
bloc97/emozilla 2023 (dynamic NTK); Peng et al. 2023 (YaRN); Ding et al. 2024
(LongRoPE); Meta 2024 (Llama 3.1 scaling); Barbero et al. 2024 (p-RoPE, proportional).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch

from posenc.functional.checks import positive_int

DEFAULT_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Validated RoPE parameters (built by ``rope_scaling.parse_rope_parameters``).

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
    #: The rule's frequencies change with the sequence length past ``length_threshold``:
    #: to one fixed set (``one_long_set``: LongRoPE's long factors) or at every length
    #: (dynamic NTK). Copied from the rule's table entry.
    length_dependent: bool = False
    length_threshold: int | None = None
    one_long_set: bool = False
    #: Every validated ``rope_parameters`` key of the rule, ``(key, value)`` pairs (keys
    #: of rules added later that have no field of their own: read them with ``param``).
    parameters: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str, default: Any = None) -> Any:
        """The validated value of ``rope_parameters[key]`` (``default`` when absent)."""
        return dict(self.parameters).get(key, default)


class RopeParameterWarning(UserWarning):
    """A ``rope_parameters`` value that transformers accepts with a logged warning, and
    that a lenient parse (``parse_rope_parameters(..., lenient=True)``, the Hugging Face
    bridge) therefore accepts too, computing what transformers computes."""


def tolerated(p: Parameters | None, message: str, value: Any) -> Any:
    """A failed check that transformers only logs: a ``ValueError`` with ``message`` in a
    strict parse (or outside one, ``p`` ``None``); in a lenient parse a
    :class:`RopeParameterWarning` and ``value``, the value transformers goes on with.

    A check calls it after its hard checks (those transformers also refuses), so going on
    never skips one."""
    if p is None or not p.lenient:
        raise ValueError(message)
    warnings.warn(f"{message}; accepted as transformers accepts it", RopeParameterWarning, stacklevel=2)
    return value


# -- how one key is checked: (key, value, parameters so far) -> the validated value ----------
def check_number(key: str, value: object, p: Parameters | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"rope_parameters[{key!r}] must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"rope_parameters[{key!r}] must be finite, got {value!r}")
    return v


def check_positive(key: str, value: object, p: Parameters | None = None) -> float:
    v = check_number(key, value)
    if v <= 0:
        raise ValueError(f"rope_parameters[{key!r}] must be > 0, got {value!r}")
    return v


def check_non_negative(key: str, value: object, p: Parameters | None = None) -> float:
    v = check_number(key, value)
    if v < 0:
        raise ValueError(f"rope_parameters[{key!r}] must be >= 0, got {value!r}")
    return v


def check_factor(key: str, value: object, p: Parameters | None = None) -> float:
    """A number >= 1. transformers logs a factor < 1 and computes with it: a lenient parse
    accepts one in (0, 1) with a warning (not 0 or below: infinite or negative frequencies)."""
    v = check_number(key, value)
    if v < 1.0:
        message = f"rope_parameters[{key!r}] must be >= 1 (a factor < 1 shrinks the context), got {value!r}"
        if v <= 0.0:
            raise ValueError(message)
        return tolerated(p, message, v)
    return v


def check_length(key: str, value: object, p: Parameters | None = None) -> int:
    return positive_int(f"rope_parameters[{key!r}]", value)


def check_flag(key: str, value: object, p: Parameters | None = None) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"rope_parameters[{key!r}] must be a bool, got {value!r}")
    return value


def check_factor_list(key: str, value: object, p: Parameters) -> tuple[float, ...]:
    """``r/2`` positive numbers, one per frequency."""
    length = p.rotary_dim // 2
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, torch.Tensor)):
        raise TypeError(f"rope_parameters[{key!r}] must be a list of numbers, got {type(value).__name__}")
    values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    if len(values) != length:
        raise ValueError(
            f"rope_parameters[{key!r}] must have rotary_dim / 2 = {length} entries (one per frequency), "
            f"got {len(values)}"
        )
    return tuple(check_positive(f"{key}[{i}]", v) for i, v in enumerate(values))


KeyCheck = Callable[[str, Any, "Parameters"], Any]


@dataclasses.dataclass
class Parameters:
    """What a rule's checks see: the sizes, and ``values``, the rule's keys checked so far
    (a check between keys may add derived values, e.g. yarn's ``factor``); ``lenient``: a
    parse that accepts what transformers accepts (see :func:`tolerated`)."""

    rope_type: str
    head_dim: int
    rotary_dim: int
    max_position_embeddings: int | None
    values: dict[str, Any]
    lenient: bool = False


# -- checks between keys ---------------------------------------------------------------------
def factor_from_lengths(p: Parameters) -> float:
    """The factor ``max_position_embeddings / original_max_position_embeddings``, as Hugging
    Face derives an absent one (DeepSeek-V3, Phi-3 configs). transformers also takes a
    derived factor < 1 (a Phi-3 config with ``max_position_embeddings`` below
    ``original_max_position_embeddings``; LongRoPE's attention factor is then 1): a
    lenient parse does too, with a warning."""
    if p.max_position_embeddings is None:
        raise ValueError(
            f"rope_type {p.rope_type!r} without 'factor' derives it as max_position_embeddings / "
            "original_max_position_embeddings: give factor or max_position_embeddings"
        )
    orig = p.values["original_max_position_embeddings"]
    derived = p.max_position_embeddings / orig
    if derived < 1.0:
        return tolerated(
            p,
            f"derived factor max_position_embeddings / original_max_position_embeddings = "
            f"{p.max_position_embeddings} / {orig} is < 1",
            derived,
        )
    return derived


def check_dynamic(p: Parameters) -> None:
    if p.max_position_embeddings is None:
        raise ValueError(
            "rope_type 'dynamic' needs max_position_embeddings (posenc: max_len), the length past which the base grows"
        )
    if p.rotary_dim <= 2:
        raise ValueError(f"rope_type 'dynamic' needs a rotary dimension > 2 (exponent r/(r-2)), got {p.rotary_dim}")


def check_yarn(p: Parameters) -> None:
    fast, slow = p.values.get("beta_fast", 32.0), p.values.get("beta_slow", 1.0)
    if fast < slow:
        tolerated(p, f"rope_parameters['beta_fast'] ({fast}) must be >= beta_slow ({slow})", None)
    # transformers warns (and uses the explicit factor) when factor is not the ratio of the
    # lengths, unless that ratio is 1 (original_max_position_embeddings filled in from
    # max_position_embeddings); a lenient parse says so too
    if p.lenient and p.max_position_embeddings is not None:
        implicit = p.max_position_embeddings / p.values["original_max_position_embeddings"]
        if implicit not in (p.values["factor"], 1.0):
            warnings.warn(
                f"rope_parameters['factor'] = {p.values['factor']} is not max_position_embeddings / "
                f"original_max_position_embeddings = {implicit}; using the explicit factor, as transformers does",
                RopeParameterWarning,
                stacklevel=2,
            )


def check_llama3(p: Parameters) -> None:
    low, high = p.values["low_freq_factor"], p.values["high_freq_factor"]
    if high <= low:
        tolerated(p, f"rope_parameters['high_freq_factor'] ({high}) must be > low_freq_factor ({low})", None)


#: ``(cfg, seq_len, device) -> (inv_freq [r/2] float64, attention_factor)``
FrequencyFunction = Callable[..., tuple[torch.Tensor, float]]


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
