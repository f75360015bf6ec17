"""The encoding contract: ``PositionalEncoding`` and its three hooks.

Shapes (the notation used in every docstring of posenc):

    b  batch          s    sequence length (s_q queries, s_k keys)
    h  query heads    h_kv key/value heads
    d  head_dim       dim  model width (d_model)

Every hook has an identity default, so an encoding implements only what it needs and
an attention layer calls all three without knowing which encoding it holds:

* ``embed(x, positions)``: additive encodings add their vectors to ``x [b, s, dim]``.
* ``rotate(q, k, q_positions, k_positions)``: rotary encodings rotate
  ``q [b, h, s_q, d]`` and ``k [b, h_kv, s_k, d]``.
* ``bias(q_positions, k_positions, *, q=None, k=None)``: relative encodings return a
  score bias ``[h, s_q, s_k]`` or ``[b, h, s_q, s_k]`` added to ``q kᵀ / sqrt(d)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from posenc.functional.checks import check_hidden, check_positions, check_positions_match, did_you_mean


@dataclasses.dataclass(frozen=True)
class Params:
    """Base class of every encoding's frozen parameter dataclass.

    Subclasses validate their fields in ``validate()``; bad values raise a
    ``ValueError``/``TypeError`` naming the parameter and the value.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - default accepts everything
        pass

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PositionalEncoding(nn.Module):
    """Base class of every positional encoding (see the module docstring for shapes).

    Class attributes describe the encoding for the registry and the CLI:
    ``name``, ``family`` (none, additive, relative, bias, contextual, rotary),
    ``reference`` (the paper), ``formula`` and ``flaw`` (why it was replaced, or its
    known limits), and ``Params`` (the frozen parameter dataclass).

    Construct with keyword arguments (``Sinusoidal(dim=512)``) or through
    ``posenc.create("sinusoidal", dim=512)``; both validate through ``Params``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "none"
    reference: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    flaw: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    #: True when the vector of a position depends on the sequence length. The class
    #: value states it for the default parameters; an instance sets its own when its
    #: parameters decide (normalized: True only with ``length=None``; rope: True only
    #: with a length-dependent scaling rule). Read it from the instance.
    length_dependent: ClassVar[bool] = False
    #: True when attention scores depend on positions only through their differences
    #: (shifting every position by the same offset changes nothing); checked by
    #: ``posenc check`` (posenc.analysis.contract).
    translation_invariant: ClassVar[bool] = False
    #: Values for required parameters that are not model sizes (e.g. rope2d's
    #: ``grid_width``), used by ``registry.create_example`` for demos, analysis and
    #: registry-wide tests. Never used to fill a user's missing parameter silently.
    example_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = self.make_params(**params)

    @classmethod
    def make_params(cls, **params: Any) -> Params:
        """Build and validate the parameter dataclass; unknown names list the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls.Params)]
        for key in params:
            if key not in valid:
                raise TypeError(
                    f"{cls.name or cls.__name__} has no parameter {key!r}; valid parameters: "
                    f"{valid}.{did_you_mean(key, valid)}"
                )
        missing = [
            f.name
            for f in dataclasses.fields(cls.Params)
            if f.name not in params and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise TypeError(f"{cls.name or cls.__name__} needs parameter(s) {missing}")
        return cls.Params(**params)

    # -- the three hooks -------------------------------------------------------------
    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Add position vectors to hidden states. ``x [b, s, dim]`` -> ``[b, s, dim]``."""
        return x

    def rotate(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate queries ``[b, h, s_q, d]`` and keys ``[b, h_kv, s_k, d]``."""
        return q, k

    def bias(
        self,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        *,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Score bias ``[h, s_q, s_k]`` or ``[b, h, s_q, s_k]``, or ``None``."""
        return None

    def score_mod(
        self,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        *,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
    ):
        """FlexAttention ``score_mod(score, b, h, q_idx, kv_idx) -> score`` adding the same
        bias as ``bias()`` inside the kernel (no ``[h, s_q, s_k]`` tensor), or ``None``
        when the encoding has no bias. ``q_idx``/``kv_idx`` index ``q_positions`` and
        ``k_positions``.

        An encoding that overrides ``bias`` must override this too (or raise a clear
        error saying FlexAttention cannot compute it): the default refuses rather than
        silently dropping the bias.
        """
        if type(self).bias is not PositionalEncoding.bias:
            raise NotImplementedError(
                f"encoding {self.name or type(self).__name__!r} defines bias() but no score_mod(); "
                "it cannot run on backend='flex', use backend='sdpa'"
            )
        return None

    def frequency_state(self, length: int) -> Any:
        """A value that changes exactly when the vectors of *earlier* positions change
        because the total length became ``length`` (dynamic NTK past its threshold,
        LongRoPE switching to long factors, normalized positions). ``None`` (the
        default) means they never do. The model's exact KV cache recomputes the prefix
        when this value changes, so decoding equals a full forward."""
        return None

    # -- introspection ---------------------------------------------------------------
    @property
    def needs_content(self) -> bool:
        """True when ``bias`` reads ``q``/``k`` (Shaw, CoPE): it is built per layer."""
        return False

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.asdict().items())


class AdditiveEncoding(PositionalEncoding):
    """An encoding that adds a vector ``table(positions)`` to the token embedding."""

    family: ClassVar[str] = "additive"

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        """Raw position vectors: positions ``[s]`` or ``[b, s]`` -> ``[s, dim]`` or
        ``[b, s, dim]`` (float32)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        check_hidden(x, self.params.dim)
        check_positions(positions)
        check_positions_match(positions, x.shape[0], x.shape[1])
        table = self.table(positions.to(x.device))  # [s, dim] or [b, s, dim]
        # Only float16 can overflow a table here (float32/bfloat16 reach 3e38): check only
        # then, so the common path adds no host sync.
        limit = torch.finfo(x.dtype).max
        if x.dtype == torch.float16 and table.numel():
            top = float(table.detach().abs().max())
            if top > limit:
                raise ValueError(
                    f"{self.name} encoding values reach {top:.4g} at position {int(positions.max())}, "
                    f"beyond the range of {x.dtype} (max {limit:.4g}); use float32/bfloat16 or shorter positions"
                )
        return x + table.to(x.dtype)
