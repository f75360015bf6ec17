"""The absolute family: one vector per token index, added to the token embedding.

The first half of the classic story (Vaswani et al. 2017 section 3.5 and the
follow-ups), each encoding with the flaw it was replaced for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from posenc import functional
from posenc.base import AdditiveEncoding, Params, PositionalEncoding
from posenc.functional.checks import check_positions, positive_float, positive_int
from posenc.registry import register


@dataclasses.dataclass(frozen=True)
class NoParams(Params):
    """NoPE takes no parameters."""


@dataclasses.dataclass(frozen=True)
class DimParams(Params):
    dim: int

    def validate(self) -> None:
        positive_int("dim", self.dim)


@register
class NoPE(PositionalEncoding):
    """No positional encoding: every hook is the identity.

    Formula: nothing is added; attention alone is permutation-equivariant, so order is
    visible only through a causal mask (Haviv et al. 2022; Kazemnejad et al. 2023).
    """

    name = "none"
    family = "none"
    translation_invariant = True  # nothing depends on positions
    reference = "Haviv et al. 2022, Transformer LMs without positional encodings still learn positional information; Kazemnejad et al. 2023"  # noqa: E501
    formula = "no position signal; order only through the causal mask"
    flaw = "without a causal mask attention is blind to order ('I go home' = 'home go I')"
    Params: ClassVar[type[Params]] = NoParams


@register
class Integer(AdditiveEncoding):
    """The raw token index added to every dimension.

    Formula: ``PE(pos, i) = pos``.

    Flaw: the values grow with length without bound; at position 1000 they are ~10^4
    times the typical token-embedding entry and drown the word's meaning.
    """

    name = "integer"
    reference = "the naive baseline of the classic story (e.g. Kazemnejad 2019 blog)"
    formula = "PE(pos, i) = pos"
    flaw = "magnitude grows linearly with position and drowns the token embedding"
    Params: ClassVar[type[Params]] = DimParams

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions)
        return functional.integer_table(positions, self.params.dim).float()


@dataclasses.dataclass(frozen=True)
class NormalizedParams(Params):
    """``length``: the fixed ``N`` of ``pos / (N - 1)`` (a causal model's training length),
    or ``None`` for the non-causal definition (each row by its own last index).
    ``causal``: whether the model using the encoding is causal; ``create_for_model``
    (``TransformerConfig``) fills it from the model's ``causal``. A causal model needs a
    ``length``."""

    dim: int
    length: int | None = None
    causal: bool = False

    def validate(self) -> None:
        positive_int("dim", self.dim)
        if self.length is not None and positive_int("length", self.length) < 2:
            raise ValueError(f"length must be >= 2 (PE = pos / (length - 1)), got {self.length}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        if self.causal and self.length is None:
            raise ValueError(
                "normalized with length=None divides each position by the last index of the whole sequence, "
                "so in a causal model every prediction would see how many tokens follow it; pass a fixed "
                "length N, the training length (TransformerConfig(..., encoding_params={'length': N}), "
                "posenc.create('normalized', dim=..., length=N)): PE(pos) = pos / (N - 1)"
            )


@register
class Normalized(AdditiveEncoding):
    """Positions scaled by a length, the same value in every dimension.

    Formula, two definitions (``posenc.functional.normalized_table``):

    * ``length=N`` (causal; required in a causal model): ``PE(pos, i) = pos / (N - 1)``
      with ``N`` fixed, the training length. Positions ``>= N`` are allowed.
    * ``length=None`` (non-causal only, e.g. a bidirectional encoder):
      ``PE(pos, i) = pos / (L - 1)`` with ``L - 1`` the largest index of each row
      (``L`` the sequence's own length); a length-1 sequence maps position 0 to 0.

    Flaw: with ``length=N``, positions past ``N - 1`` give values above 1 that a model
    trained at length ``N`` never saw. With ``length=None``, the same position gets
    different vectors in sequences of different lengths (position 3 is 0.75 at L=5 and
    0.3 at L=11), so nothing learned about position 3 transfers, and every position's
    vector depends on how many tokens follow it: a causal model would see the future's
    length, so building it causal is refused.

    ``length_dependent`` is per instance: True only when ``length is None``.
    """

    name = "normalized"
    reference = "the classic story's second step (e.g. Kazemnejad 2019 blog)"
    formula = (
        "causal, length=N: PE(pos, i) = pos / (N - 1), N fixed (the training length); "
        "length=None (non-causal only): PE(pos, i) = pos / (L - 1), L the sequence's own length"
    )
    flaw = (
        "length=N: positions past N - 1 give values above 1, never seen in training; "
        "length=None: the same position gets a different vector at every sequence length, "
        "and each vector depends on how many tokens follow (refused in a causal model)"
    )
    Params: ClassVar[type[Params]] = NormalizedParams
    #: The default (``length=None``) is length dependent; an instance with a fixed
    #: ``length`` sets False (``__init__``).
    length_dependent = True
    #: A fixed length, so that demos, analysis and registry-wide tests can build it in a
    #: causal model (128: the report card's trained length, ``CardConfig.train_length``).
    example_params: ClassVar[dict] = {"length": 128}

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.length_dependent = self.params.length is None

    def frequency_state(self, length: int):
        # Every position's value depends on the current length unless it is fixed.
        return None if self.params.length is not None else length

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions)
        return functional.normalized_table(positions, self.params.dim, self.params.length).float()


@register
class Binary(AdditiveEncoding):
    """The bits of the token index, least significant first.

    Formula: ``PE(pos, i) = floor(pos / 2**i) mod 2``.

    Flaw: discontinuous: going from 2**k - 1 to 2**k flips k+1 dimensions at once, so
    neighbouring positions can be far apart; at most 2**dim positions exist.
    """

    name = "binary"
    reference = "the classic story's third step (e.g. Kazemnejad 2019 blog)"
    formula = "PE(pos, i) = bit i of pos"
    flaw = "discontinuous jumps between neighbouring positions; only 2**dim positions"
    Params: ClassVar[type[Params]] = DimParams

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions)
        return functional.binary_table(positions, self.params.dim).float()


@dataclasses.dataclass(frozen=True)
class SineParams(Params):
    dim: int
    min_period: int = 4
    ratio: int = 2

    def validate(self) -> None:
        positive_int("dim", self.dim)
        # Period 2 samples sin(pi * pos) = 0 at every integer: a dead dimension.
        if positive_int("min_period", self.min_period) < 3:
            raise ValueError(f"min_period must be >= 3 (period 2 is zero at every integer), got {self.min_period}")
        if positive_int("ratio", self.ratio) < 2:
            raise ValueError(f"ratio must be >= 2, got {self.ratio}")
        # Periods are float64; the phase pos mod P_i is exact for every period (P_i > pos
        # just gives pos). Only a period past float64's range is refused.
        if math.log10(self.min_period) + (self.dim - 1) * math.log10(self.ratio) > 300:
            raise ValueError(
                f"periods min_period * ratio**(dim-1) exceed float64 for dim={self.dim}, "
                f"min_period={self.min_period}, ratio={self.ratio}"
            )


@register
class Sine(AdditiveEncoding):
    """Sines of geometrically spaced periods, without cosines ("continuous binary").

    Formula: ``PE(pos, i) = sin(2 pi pos / P_i)`` with ``P_i = min_period * ratio**i``.

    Flaw: smooth, but the whole vector repeats with period ``P_{dim-1}`` (positions
    collide), and without a cosine partner no fixed linear map takes PE(pos) to
    PE(pos + k), so relative offsets are not easy to read off. With many dimensions
    the long periods make the upper dimensions nearly constant (about 0): at dim 64
    only the first ~log2(L) dimensions vary over a length-L sequence.
    """

    name = "sine"
    reference = "the classic story's fourth step: binary made continuous"
    formula = "PE(pos, i) = sin(2 pi pos / (min_period * ratio**i))"
    flaw = "repeats with the longest period (collisions); no linear relative offset"
    Params: ClassVar[type[Params]] = SineParams

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions)
        p = self.params
        return functional.sine_table(positions, p.dim, p.min_period, p.ratio).float()


@dataclasses.dataclass(frozen=True)
class SinusoidalParams(Params):
    dim: int
    base: float = 10000.0

    def validate(self) -> None:
        if positive_int("dim", self.dim) % 2:
            raise ValueError(f"dim must be even (sin/cos pairs), got {self.dim}")
        positive_float("base", self.base, minimum=1.0)


@register
class Sinusoidal(AdditiveEncoding):
    """Vaswani et al. 2017 sinusoidal encoding.

    Formula: ``PE(pos, 2i) = sin(pos / base**(2i/dim))``,
    ``PE(pos, 2i+1) = cos(pos / base**(2i/dim))``.

    Flaw: unique and smooth, and PE(pos + k) is a rotation of PE(pos); but a model
    trained up to length L has never seen the vectors past L (trained to 250, asked
    about 251) and extrapolates poorly (Press et al. 2022).
    """

    name = "sinusoidal"
    reference = "Vaswani et al. 2017, Attention Is All You Need, section 3.5"
    formula = "PE(pos, 2i) = sin(pos / base^(2i/dim)); PE(pos, 2i+1) = cos(pos / base^(2i/dim))"
    flaw = "positions past the trained length are vectors the model never saw"
    Params: ClassVar[type[Params]] = SinusoidalParams

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions)
        return functional.sinusoidal_table(positions, self.params.dim, self.params.base).float()


@dataclasses.dataclass(frozen=True)
class LearnedParams(Params):
    dim: int
    max_len: int = 1024
    init_std: float = 0.02

    def validate(self) -> None:
        positive_int("dim", self.dim)
        positive_int("max_len", self.max_len)
        positive_float("init_std", self.init_std, inclusive=True)


@register
class Learned(AdditiveEncoding):
    """A learned table of ``max_len`` vectors (GPT-2, BERT).

    Formula: ``PE(pos) = W[pos]`` with ``W [max_len, dim]`` trained by backprop,
    initialized ``N(0, init_std**2)``.

    Flaw: positions ``>= max_len`` do not exist (a clear ``ValueError`` here), and
    rows for positions rarely seen in training stay near their random init.
    """

    name = "learned"
    reference = "Gehring et al. 2017; Devlin et al. 2019 (BERT); Radford et al. 2019 (GPT-2)"
    formula = "PE(pos) = W[pos], W learned, pos < max_len"
    flaw = "no vector exists past max_len; rarely seen rows stay untrained"
    Params: ClassVar[type[Params]] = LearnedParams

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.weight = nn.Parameter(torch.empty(self.params.max_len, self.params.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.params.init_std)

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions)
        if positions.numel():
            top = int(positions.max())
            if top >= self.params.max_len:
                raise ValueError(
                    f"learned encoding has max_len={self.params.max_len} positions (0..{self.params.max_len - 1}); "
                    f"got position {top}. Build it with a larger max_len or use an encoding that extrapolates."
                )
        return self.weight[positions.to(self.weight.device)]  # [..., dim]


__all__ = ["Binary", "Integer", "Learned", "NoPE", "Normalized", "Sine", "Sinusoidal"]
