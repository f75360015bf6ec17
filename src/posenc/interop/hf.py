"""Hugging Face transformers bridge for the rotary family.

* :func:`rope_from_config`: a posenc ``RoPE`` from a transformers config (its
  ``rope_parameters``, ``head_dim`` and ``max_position_embeddings``).
* :func:`frequencies_from_config`: ``(inv_freq, attention_factor)`` of a config at a
  length, as transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len)``.
* :func:`patch_rope`: replace every ``*RotaryEmbedding`` of a transformers model
  (Llama, Qwen2, GPT-NeoX, ... any model whose attention consumes ``(cos, sin)`` from a
  ``rotary_emb`` module) by :class:`PosencRotaryEmbedding`, so the model's attention
  rotates with posenc's exact-angle cos/sin and posenc's scaling rules.
* :func:`permute_qk_weight` (re-exported): convert q/k projections between the
  interleaved (GPT-J/Meta) and half (NeoX/Hugging Face) layouts.

transformers is imported only by the caller; nothing here downloads anything.

Every config transformers runs is taken, parsed as transformers parses it
(``parse_rope_parameters(..., lenient=True)``, rules from the table of
``functional/rope_scaling.py``): where transformers logs a warning and goes on (a key the
rope_type does not use, e.g. ``original_max_position_embeddings`` in a ``linear`` dict; a
factor below 1, e.g. LongRoPE's derived factor of a Phi-3 config whose
``max_position_embeddings`` is below ``original_max_position_embeddings``; ``beta_fast <
beta_slow``; ``high_freq_factor <= low_freq_factor``), the bridge issues a
``RopeParameterWarning`` (``warnings.warn``, so it can be filtered or turned into an
error) and computes what transformers computes. ``posenc.rope_frequencies`` and
``posenc.create("rope", ...)`` stay strict.

Caveat: a patched transformers model still caches keys *after* rotation (its own
cache), so with ``dynamic`` scaling its incremental decoding differs from a full forward
once the length passes ``max_position_embeddings`` (a known transformers behaviour).
posenc's own ``Attention`` caches keys before rotation and has no such drift.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from posenc.encodings.rotary import RoPE, RoPEParams
from posenc.functional.rope import expand_cos_sin, permute_qk_weight
from posenc.functional.rope_rules import RopeConfig, RopeParameterWarning
from posenc.functional.rope_scaling import frequencies, parse_rope_parameters

__all__ = [
    "PosencRotaryEmbedding",
    "RopeParameterWarning",
    "TransformersRoPE",
    "frequencies_from_config",
    "patch_rope",
    "permute_qk_weight",
    "rope_from_config",
    "rope_parameters_of",
]


def rope_parameters_of(config: Any) -> tuple[int, dict, int | None]:
    """``(head_dim, rope_parameters, max_position_embeddings)`` of a transformers config,
    after transformers' own standardisation (``rope_theta`` and
    ``partial_rotary_factor`` moved into the dict, legacy ``type`` renamed)."""
    if hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
    params = getattr(config, "rope_parameters", None)
    if params is None:
        raise ValueError(f"{type(config).__name__} has no rope_parameters; is it a RoPE model?")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters (nested dicts) are not supported; pass one of the dicts")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, dict(params), getattr(config, "max_position_embeddings", None)


@dataclasses.dataclass(frozen=True)
class TransformersRoPEParams(RoPEParams):
    """``RoPEParams`` whose ``rope_parameters`` are parsed as transformers parses them
    (``parse_rope_parameters(..., lenient=True)``), once: the warnings come once."""

    def config(self) -> RopeConfig:
        cfg = self.__dict__.get("_cfg")
        if cfg is None:
            cfg = parse_rope_parameters(
                self.head_dim,
                self.hf_parameters(),
                max_position_embeddings=self.max_len,
                rotary_dim=self.rotary_dim,
                lenient=True,
            )
            object.__setattr__(self, "_cfg", cfg)
        return cfg


class TransformersRoPE(RoPE):
    """A posenc ``RoPE`` (same rotation, tables and cache behaviour) built from a
    transformers config's ``rope_parameters`` with transformers' leniency (see the module
    docstring); made by :func:`rope_from_config`. Not registered: ``posenc.create("rope")``
    stays strict."""

    Params = TransformersRoPEParams


def rope_from_config(config: Any, *, layout: str = "half") -> TransformersRoPE:
    """A posenc ``RoPE`` equal to the rotary embedding transformers builds from ``config``.

    Warns (``RopeParameterWarning``) where transformers warns, and computes what it
    computes; raises where transformers cannot build the rotary embedding (unknown
    rope_type, missing keys, factor lists of the wrong length, ...)."""
    head_dim, params, max_len = rope_parameters_of(config)
    return TransformersRoPE(head_dim=head_dim, layout=layout, max_len=max_len, rope_parameters=params)


def frequencies_from_config(
    config: Any, seq_len: int | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, float]:
    """``(inv_freq [r/2] float64, attention_factor)`` of ``config`` at total length
    ``seq_len``: transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config, device,
    seq_len=seq_len)`` (the model's default rule for ``default``), in float64. ``seq_len``
    ``None`` or 0 is no length, as in transformers (``dynamic``: ``max_position_embeddings``;
    ``longrope``: the short factors)."""
    pe = rope_from_config(config)
    return frequencies(pe.cfg, seq_len, device, lenient=True)


class PosencRotaryEmbedding(nn.Module):
    """Drop-in for a transformers ``*RotaryEmbedding``: ``forward(x, position_ids)``
    returns ``(cos, sin)`` ``[b, s, r]`` in ``x.dtype`` for ``apply_rotary_pos_emb``.

    The values come from ``pe.cos_sin`` (float64 angles, attention factor applied,
    frequencies of the length ``max(position_ids) + 1`` for dynamic/longrope), expanded
    to the half layout that transformers' ``rotate_half`` expects.
    """

    def __init__(self, pe: RoPE) -> None:
        super().__init__()
        if not isinstance(pe, RoPE):
            raise TypeError(f"pe must be a posenc RoPE, got {type(pe).__name__}")
        if pe.layout != "half":
            raise ValueError(
                "transformers' apply_rotary_pos_emb rotates in the half layout; build the RoPE with layout='half' "
                "(and convert interleaved q/k weights with permute_qk_weight)"
            )
        self.pe = pe

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        if layer_type is not None:
            raise ValueError("per-layer-type RoPE is not supported by PosencRotaryEmbedding")
        cos, sin = self.pe.cos_sin(position_ids.to(x.device))  # [b, s, r/2] float32
        cos, sin = expand_cos_sin(cos, sin, "half")  # [b, s, r]
        return cos.to(x.dtype), sin.to(x.dtype)


def patch_rope(model: nn.Module, pe: RoPE | None = None) -> list[str]:
    """Replace every rotary-embedding submodule of a transformers ``model`` in place.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``GPTNeoXForCausalLM``.
        pe: the posenc RoPE to use (shared); default :func:`rope_from_config` of
            ``model.config``, so logits equal the unpatched model's.

    Returns:
        the names of the replaced submodules (a ``ValueError`` if there are none).
    """
    if pe is None:
        pe = rope_from_config(model.config)
    names = [
        name
        for name, module in model.named_modules()
        if name.split(".")[-1] == "rotary_emb" and hasattr(module, "inv_freq") and not isinstance(module, nn.ModuleList)
    ]
    if not names:
        raise ValueError(f"found no 'rotary_emb' module with inv_freq in {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if old.inv_freq.shape[-1] != pe.cfg.rotary_dim // 2:
            raise ValueError(
                f"{name} has {old.inv_freq.shape[-1]} frequencies, the posenc RoPE {pe.cfg.rotary_dim // 2}"
            )
        setattr(parent, child, PosencRotaryEmbedding(pe).to(old.inv_freq.device))
    return names
