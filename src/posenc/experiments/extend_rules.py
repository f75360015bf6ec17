"""The context-extension rules of ``posenc extend``: each rule's Hugging Face
``rope_parameters`` for a model trained at context ``C`` and a factor ``s``, and the
swap of a trained model's plain RoPE for a rule (same weights).

The rules are the entries of ``posenc.functional.rope_scaling.SCALING_RULES`` that have a
``stretch`` recipe, under their CLI names (aliases such as ``pi`` accepted).

Chen et al. 2023 (linear / position interpolation), bloc97 2023 (NTK-aware), emozilla
2023 (dynamic NTK), Peng et al. 2023 (YaRN), Meta 2024 (Llama 3.1); the table of rules
is in ``posenc.experiments.extend``'s docstring and docs/extension.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from posenc.experiments.config import RunConfig, replace
from posenc.functional.rope_scaling import extension_rule, extension_rules
from posenc.model import Transformer

#: The extension rules of the table, in table order (the default of ``posenc extend --rules``).
RULES: tuple[str, ...] = extension_rules()
# Keys a base model's rope parameters may carry (anything else means it was already scaled).
_KEPT_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
_KEPT_FLAT = ("layout", "rotary_dim", "partial_rotary_factor")


def check_factor(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= 1 (a multiple of the trained length), got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (rules only stretch the context), got {value}")
    return value


def has_factor(rule: str) -> bool:
    """Whether ``rule``'s parameters depend on its factor (every rule but ``none``)."""
    stretch = extension_rule(rule).stretch
    return stretch(1.0, 64, 16, 10000.0) != stretch(2.0, 64, 16, 10000.0)


@dataclasses.dataclass(frozen=True)
class Finetune:
    """The fine-tuning budget, the same for every rule: ``steps`` at length
    ``factor * L`` with ``batch_size`` (default: the base batch divided by ``factor``,
    so a step sees as many tokens as a base step), ``lr`` and ``warmup``."""

    factor: int = 4
    steps: int = 200
    batch_size: int | None = None
    lr: float = 1e-3
    warmup: int = 15

    def __post_init__(self) -> None:
        check_factor("finetune_factor", self.factor)
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"finetune {name} must be an int >= 1, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"finetune lr must be > 0, got {self.lr!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"finetune warmup must be an int >= 0, got {self.warmup!r}")


def check_rules(rules: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The rules' CLI names (``"pi"`` -> ``"linear"``); unknown ones raise, with a "did you mean"."""
    if not rules:
        raise ValueError("no rules given")
    return tuple(_cli_name(r) for r in rules)


def _cli_name(rule: str) -> str:
    entry = extension_rule(rule)
    return entry.cli_name or entry.name


def check_factors(factors: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    if not factors:
        raise ValueError("no factors given")
    return tuple(sorted({check_factor("factor", f) for f in factors}))


def trained_context(config: RunConfig) -> int:
    """``C``: positions the model saw in training (``L`` for corpora; the longest
    training input ``sequence_length(L) - 1`` for synthetic tasks)."""
    return positions_at(config, config.task.train_length)


def positions_at(config: RunConfig, length: int) -> int:
    """Positions a model reads at evaluation length ``length``: ``length`` for corpora,
    the input of one example (``sequence_length(n) - 1``) for synthetic tasks."""
    t = config.task
    if t.is_lm:
        return length
    return t.synthetic_task().sequence_length(length) - 1


def covering_factor(config: RunConfig, length: int, minimum: int = 1) -> int:
    """The smallest integer factor ``s >= minimum`` whose stretched context ``s * C``
    covers the positions read at ``length``: ``max(minimum, ceil(positions / C))``.

    Peng et al. 2023 (YaRN) judge a model at a length inside its factor's context
    (``factor = length / C``): with ``minimum`` = the fine-tune's factor this is that
    setting for a fine-tuned model. A corpus at ``s * L`` gives ``s``; copy at ``n = s * L``
    (``2n + 1`` input positions, ``C = 2L + 1``) also gives ``s``.
    """
    check_factor("minimum", minimum)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    return max(minimum, math.ceil(positions_at(config, length) / trained_context(config)))


def base_rope(config: RunConfig) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(kept flat params, kept HF keys, rotary dim) of a plain (unscaled) RoPE model."""
    if config.model.encoding != "rope":
        raise ValueError(f"extend needs a rope model, got encoding {config.model.encoding!r}")
    head_dim = config.model.dim // config.model.num_heads
    pe = _rope(head_dim, dict(config.model.encoding_params))
    hf = pe.params.hf_parameters()
    if hf.get("rope_type", "default") != "default" or set(hf) - {"rope_type", *_KEPT_ROPE_KEYS}:
        raise ValueError(f"extend needs a plain (unscaled) rope model, got rope parameters {hf}")
    flat = {k: v for k, v in config.model.encoding_params.items() if k in _KEPT_FLAT}
    return flat, {k: hf[k] for k in _KEPT_ROPE_KEYS if k in hf}, pe.cfg.rotary_dim


def _rope(head_dim: int, params: dict[str, Any]):
    from posenc.registry import create

    return create("rope", head_dim=head_dim, **params)


def rule_parameters(
    rule: str,
    factor: int,
    context: int,
    *,
    rotary_dim: int,
    rope_theta: float = 10000.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Hugging Face ``rope_parameters`` of ``rule`` stretching ``context`` by ``factor``.

    ``posenc.rope_frequencies(head_dim, rule_parameters(...), max_position_embeddings=context,
    seq_len=n)`` gives the frequencies used at length ``n``.
    """
    entry = extension_rule(rule)
    check_factor("factor", factor)
    params = {"rope_type": entry.rope_type or entry.name}
    params.update(entry.stretch(float(factor), context, rotary_dim, float(rope_theta)))
    base = {"rope_theta": float(rope_theta), **(extra or {})}
    if "rope_theta" in params:  # a rule that grows the base (static NTK)
        base["rope_theta"] = params.pop("rope_theta")
    return {**params, **base}


def rule_config(config: RunConfig, rule: str, factor: int) -> RunConfig:
    """``config`` with its plain RoPE replaced by ``rule`` at ``factor`` (``max_len`` = the
    trained context, dynamic NTK's threshold)."""
    flat, hf, rotary_dim = base_rope(config)
    theta = hf.pop("rope_theta", 10000.0)
    params = rule_parameters(rule, factor, trained_context(config), rotary_dim=rotary_dim, rope_theta=theta, extra=hf)
    encoding_params = {**flat, "rope_parameters": params, "max_len": trained_context(config)}
    return replace(config, model={"encoding_params": encoding_params})


def swap_rule(model: Transformer, config: RunConfig, rule: str, factor: int) -> tuple[RunConfig, Transformer]:
    """A copy of ``model`` (same weights) whose encoding is ``rule`` at ``factor``."""
    new_cfg = rule_config(config, rule, factor)
    new = Transformer(dataclasses.replace(model.config, encoding_params=dict(new_cfg.model.encoding_params)))
    new.load_state_dict(model.state_dict())  # rope has no weights: every tensor must match
    return new_cfg, new.eval()
