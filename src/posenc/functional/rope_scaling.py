"""The RoPE scaling rules, declared once: one :class:`ScalingRule` per rule in
``SCALING_RULES``, and the functions that read it.

An entry says everything posenc needs to know about a rule: its frequency function
(``rope_rules``), the ``rope_parameters`` keys it takes and how each is checked, the
checks between keys, whether its frequencies depend on the sequence length, and its name
on the command line (``posenc extend --rules``), its aliases and the parameters that
stretch a trained context (``stretch``). Adding a rule is one function and one entry
(docs/rotary.md, "Adding a scaling rule"); ``rope_frequencies``, ``posenc.create("rope",
rope_type=...)``, ``posenc extend`` and the scaling plot read the table.

    inv_freq, attention_factor = rope_frequencies(head_dim, rope_parameters,
                                                  max_position_embeddings=..., seq_len=...)

Shapes: ``inv_freq`` is ``[r/2]`` float64, ``r`` the rotary dimension
(``int(head_dim * partial_rotary_factor)``; ``head_dim`` for ``proportional``).
Unlike Hugging Face, bad input raises (naming the key) instead of logging a warning.
The Hugging Face bridge (``posenc.interop.hf``) parses with ``lenient=True`` instead: what
transformers accepts with a logged warning is accepted with a ``RopeParameterWarning``
(keys the rope_type does not use are dropped; ``tolerated`` checks warn) and computed as
transformers computes it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from posenc.functional.checks import did_you_mean, nonnegative_int, positive_int
from posenc.functional.rope_rules import (
    DEFAULT_THETA,
    FrequencyFunction,
    KeyCheck,
    Parameters,
    RopeConfig,
    RopeParameterWarning,
    check_dynamic,
    check_factor,
    check_factor_list,
    check_flag,
    check_length,
    check_llama3,
    check_non_negative,
    check_number,
    check_positive,
    check_yarn,
    default_frequencies,
    dynamic_frequencies,
    factor_from_lengths,
    linear_frequencies,
    llama3_frequencies,
    longrope_frequencies,
    proportional_frequencies,
    yarn_frequencies,
)

#: Keys every rope_type accepts.
COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


# -- the table ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScalingRule:
    """One RoPE scaling rule.

    Attributes:
        name: the ``rope_type`` (Hugging Face's name).
        frequencies: ``(cfg, seq_len, device) -> (inv_freq [r/2] float64, attention_factor)``.
        keys: the keys it takes beyond ``COMMON_KEYS``, each with its check
            ``(key, value, parameters) -> validated value``, checked in this order. A
            lenient parse drops (with a warning) every other key, as transformers ignores
            (and logs) the keys its validator does not list for the rope_type; a check
            whose failure transformers only logs calls ``rope_rules.tolerated``.
        required: those of ``keys`` that must be given.
        derived: values of absent keys computed from the others, ``(parameters) -> value``
            (yarn and longrope derive ``factor`` from the two lengths, as Hugging Face).
        check: checks between keys, run after every key's own.
        length_dependent: its frequencies change with the sequence length past the value of
            ``threshold`` (a :class:`RopeConfig` field): to one fixed set when
            ``one_long_set`` (LongRoPE), else at every length (dynamic NTK).
        whole_head: ``inv_freq`` covers the whole head and ``partial_rotary_factor`` zeroes
            pairs instead of shortening ``r`` (p-RoPE).
        cli_name: its name in ``posenc extend --rules`` and the plots (default ``name``).
        aliases: other names accepted wherever a rule name is read (lower case).
        stretch: ``(factor, context, rotary_dim, theta) -> rope_parameters keys`` that
            stretch a model trained at ``context`` positions by ``factor`` (``posenc
            extend``); ``None``: not an extension rule.
        rope_type: for a rule that is not a rope_type of its own, the rope_type whose
            parameters express it (static NTK is ``default`` with a grown base): known to
            ``posenc extend``, not to ``rope_frequencies``.
    """

    name: str
    frequencies: FrequencyFunction | None
    keys: Mapping[str, KeyCheck] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()
    derived: Mapping[str, Callable[[Parameters], Any]] = dataclasses.field(default_factory=dict)
    check: Callable[[Parameters], None] | None = None
    length_dependent: bool = False
    threshold: str = "max_position_embeddings"
    one_long_set: bool = False
    whole_head: bool = False
    cli_name: str | None = None
    aliases: tuple[str, ...] = ()
    stretch: Callable[[float, int, int, float], dict[str, Any]] | None = None
    rope_type: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the rule: ``name``, ``cli_name``, aliases."""
        return tuple(dict.fromkeys((self.name, self.cli_name or self.name, *self.aliases)))


SCALING_RULES: dict[str, ScalingRule] = {
    rule.name: rule
    for rule in (
        ScalingRule(
            "default", default_frequencies, cli_name="none", aliases=("direct", "plain"), stretch=lambda s, c, r, t: {}
        ),
        ScalingRule(
            "linear",
            linear_frequencies,
            keys={"factor": check_factor},
            required=("factor",),
            aliases=("pi", "position_interpolation", "interpolation"),
            stretch=lambda s, c, r, t: {"factor": s},
        ),
        ScalingRule(
            "ntk",
            None,
            rope_type="default",
            aliases=("ntk-aware", "ntk_aware", "static_ntk"),
            stretch=lambda s, c, r, t: {"rope_theta": t * s ** (r / (r - 2))},
        ),
        ScalingRule(
            "dynamic",
            dynamic_frequencies,
            keys={"factor": check_factor},
            required=("factor",),
            check=check_dynamic,
            length_dependent=True,
            aliases=("dynamic_ntk", "dynamic-ntk"),
            stretch=lambda s, c, r, t: {"factor": s},
        ),
        ScalingRule(
            "yarn",
            yarn_frequencies,
            keys={
                "original_max_position_embeddings": check_length,
                "factor": check_factor,
                "attention_factor": check_positive,
                "beta_fast": check_positive,
                "beta_slow": check_positive,
                "mscale": check_non_negative,
                "mscale_all_dim": check_non_negative,
                "truncate": check_flag,
            },
            required=("original_max_position_embeddings",),
            derived={"factor": factor_from_lengths},
            check=check_yarn,
            stretch=lambda s, c, r, t: {
                "factor": s,
                "original_max_position_embeddings": c,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
        ),
        ScalingRule(
            "longrope",
            longrope_frequencies,
            keys={
                "original_max_position_embeddings": check_length,
                "factor": check_factor,
                "attention_factor": check_positive,
                "short_factor": check_factor_list,
                "long_factor": check_factor_list,
            },
            required=("short_factor", "long_factor", "original_max_position_embeddings"),
            derived={"factor": factor_from_lengths},
            length_dependent=True,
            threshold="original_max_position_embeddings",
            one_long_set=True,
        ),
        ScalingRule(
            "llama3",
            llama3_frequencies,
            keys={
                "original_max_position_embeddings": check_length,
                "factor": check_factor,
                "low_freq_factor": check_positive,
                "high_freq_factor": check_positive,
            },
            required=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            check=check_llama3,
            aliases=("llama3.1", "llama-3"),
            stretch=lambda s, c, r, t: {
                "factor": s,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": c,
            },
        ),
        ScalingRule(
            "proportional",
            proportional_frequencies,
            keys={"factor": check_factor},
            whole_head=True,
            aliases=("p-rope",),
        ),
    )
}


def rope_types() -> tuple[str, ...]:
    """The ``rope_type`` values ``rope_frequencies`` accepts (rules that are a rope_type of
    their own), in table order."""
    return tuple(name for name, rule in SCALING_RULES.items() if rule.rope_type is None)


def all_keys() -> tuple[str, ...]:
    """Every key some rope_type accepts, sorted."""
    keys = set(COMMON_KEYS)
    for rule in SCALING_RULES.values():
        keys.update(rule.keys)
    return tuple(sorted(keys))


def scaling_rule(name: str, *, rules: Mapping[str, ScalingRule] | None = None) -> ScalingRule:
    """The rule called ``name``: its rope_type, CLI name or an alias (any case).

    Raises:
        ValueError: unknown name, listing the names and the closest one.
    """
    rules = SCALING_RULES if rules is None else rules
    if not isinstance(name, str):
        raise TypeError(f"a scaling rule name must be a str, got {name!r}")
    wanted = name.strip().lower()
    for rule in rules.values():
        if wanted in rule.names:
            return rule
    known = [n for rule in rules.values() for n in rule.names]
    main = [rule.cli_name or rule.name for rule in rules.values()]
    raise ValueError(f"unknown rule {name!r}; available: {main}.{did_you_mean(wanted, known)}")


def canonical_rope_type(name: object) -> object:
    """``name`` as a rope_type when it names (or aliases) a rule that is one (``"pi"`` ->
    ``"linear"``); anything else unchanged, for the strict check to refuse."""
    if isinstance(name, str):
        for rule in SCALING_RULES.values():
            if rule.rope_type is None and name.strip().lower() in rule.names:
                return rule.name
    return name


def extension_rules() -> tuple[str, ...]:
    """CLI names of the rules ``posenc extend`` can apply (those with ``stretch``), in table order."""
    return tuple(rule.cli_name or rule.name for rule in SCALING_RULES.values() if rule.stretch is not None)


def extension_rule(name: str) -> ScalingRule:
    """The extension rule called ``name`` (CLI name or alias); a ``ValueError`` naming the
    available ones otherwise."""
    return scaling_rule(name, rules={n: r for n, r in SCALING_RULES.items() if r.stretch is not None})


# -- parsing -------------------------------------------------------------------------------------
def parse_rope_parameters(
    head_dim: int,
    rope_parameters: Mapping | None = None,
    *,
    max_position_embeddings: int | None = None,
    rotary_dim: int | None = None,
    lenient: bool = False,
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
        lenient: accept what transformers accepts with a logged warning (the Hugging Face
            bridge): keys the rope_type does not use (unknown ones too) are dropped,
            ``rope_type`` wins over a different legacy ``type``, and the checks that call
            ``rope_rules.tolerated`` (factor in (0, 1), a derived factor < 1,
            ``beta_fast < beta_slow``, ``high_freq_factor <= low_freq_factor``) pass; each
            with a :class:`RopeParameterWarning`. Everything else stays an error.

    Raises:
        TypeError/ValueError naming the key: unknown keys or rope_types, keys the
        rope_type does not use, missing required keys, wrong types, bad values (in a
        lenient parse only what transformers refuses or cannot compute).
    """
    head_dim = positive_int("head_dim", head_dim)
    if rope_parameters is None:
        rope_parameters = {}
    if not isinstance(rope_parameters, Mapping):
        raise TypeError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    if max_position_embeddings is not None:
        max_position_embeddings = positive_int("max_position_embeddings", max_position_embeddings)
    raw = {k: v for k, v in rope_parameters.items() if v is not None}
    known = all_keys()
    for key in raw:
        if not lenient and (not isinstance(key, str) or key not in known):
            raise ValueError(
                f"rope_parameters has unknown key {key!r}; valid keys: {list(known)}.{did_you_mean(str(key), known)}"
            )
    if "type" in raw and "rope_type" in raw and raw["type"] != raw["rope_type"]:
        message = f"rope_parameters has rope_type={raw['rope_type']!r} and type={raw['type']!r}; keep one"
        if not lenient:
            raise ValueError(message)
        warnings.warn(
            f"{message}; using rope_type, as transformers does (it ignores type)", RopeParameterWarning, stacklevel=2
        )
        del raw["type"]
    rope_type = raw.pop("rope_type", raw.pop("type", "default"))
    raw.pop("type", None)
    if not isinstance(rope_type, str):
        raise TypeError(f"rope_parameters['rope_type'] must be a str, got {rope_type!r}")
    types = rope_types()
    if rope_type not in types:
        raise ValueError(
            f"rope_parameters['rope_type'] {rope_type!r} is not supported; valid: {list(types)}."
            f"{did_you_mean(rope_type, types)}"
        )
    rule = SCALING_RULES[rope_type]
    allowed = set(COMMON_KEYS) | set(rule.keys)
    unused = [key for key in raw if key not in allowed]
    if lenient and unused:
        warnings.warn(
            f"rope_parameters keys {unused} are not used by rope_type {rope_type!r} (it takes "
            f"{sorted(allowed - {'type'})}); ignored, as transformers ignores them "
            "('Unrecognized keys in `rope_parameters`')",
            RopeParameterWarning,
            stacklevel=2,
        )
        raw = {k: v for k, v in raw.items() if k not in unused}
    for key in raw:
        if key not in allowed:
            hint = ""
            if rule.length_dependent and rule.threshold == "max_position_embeddings" and key.startswith("original"):
                hint = f"; {rope_type}'s threshold is max_position_embeddings (posenc: max_len)"
            raise ValueError(
                f"rope_parameters key {key!r} is not used by rope_type {rope_type!r} "
                f"(it takes {sorted(allowed - {'type'})}){hint}"
            )
    for key in rule.required:
        if key not in raw:
            raise ValueError(f"rope_parameters for rope_type {rope_type!r} needs key {key!r}")

    theta = check_number("rope_theta", raw.get("rope_theta", DEFAULT_THETA))
    if theta <= 1.0:
        raise ValueError(f"rope_parameters['rope_theta'] must be > 1, got {raw['rope_theta']!r}")
    prf = check_number("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if rule.whole_head:
        if not 0.0 <= prf <= 1.0:
            raise ValueError(f"rope_parameters['partial_rotary_factor'] must be in [0, 1], got {prf!r}")
        if rotary_dim is not None:
            raise ValueError(f"rotary_dim cannot be combined with rope_type {rope_type!r} (use partial_rotary_factor)")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rope_type {rope_type!r}, got {head_dim}")
        r = head_dim
    elif rotary_dim is not None:
        if "partial_rotary_factor" in raw:
            raise ValueError("give rotary_dim or partial_rotary_factor, not both")
        r = positive_int("rotary_dim", rotary_dim)
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

    p = Parameters(rope_type, head_dim, r, max_position_embeddings, {}, lenient=lenient)
    for key, check in rule.keys.items():
        if key in raw:
            p.values[key] = check(key, raw[key], p)
        elif key in rule.derived:
            p.values[key] = rule.derived[key](p)
    if rule.check is not None:
        rule.check(p)
    fields = {f.name for f in dataclasses.fields(RopeConfig)}
    cfg = RopeConfig(
        rope_type=rope_type,
        head_dim=head_dim,
        rotary_dim=r,
        theta=theta,
        partial_rotary_factor=prf,
        max_position_embeddings=max_position_embeddings,
        length_dependent=rule.length_dependent,
        one_long_set=rule.one_long_set,
        parameters=tuple(p.values.items()),
        **{k: v for k, v in p.values.items() if k in fields},
    )
    if rule.length_dependent:
        cfg = dataclasses.replace(cfg, length_threshold=getattr(cfg, rule.threshold))
    return cfg


def frequencies(
    cfg: RopeConfig, seq_len: int | None = None, device=None, *, lenient: bool = False
) -> tuple[torch.Tensor, float]:
    """``(inv_freq [r/2] float64, attention_factor)`` of a validated config at ``seq_len``
    (an int > 0, or ``None``: no length, the frequencies up to the rule's threshold).

    ``lenient`` (the Hugging Face bridge) also takes ``seq_len = 0`` as transformers does:
    its length-dependent rules read 0 as no length (``longrope``: ``if seq_len and seq_len >
    original_max_position_embeddings``; ``dynamic``: ``max(seq_len,
    max_position_embeddings)``), so 0 gives the frequencies of ``None``."""
    if seq_len is not None:
        if isinstance(seq_len, torch.Tensor):
            seq_len = int(seq_len)
        if lenient:
            seq_len = nonnegative_int("seq_len", seq_len) or None
        else:
            seq_len = positive_int("seq_len", seq_len)
    return SCALING_RULES[cfg.rope_type].frequencies(cfg, seq_len, device)


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
