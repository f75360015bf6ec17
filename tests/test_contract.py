"""The encoding contract (posenc.analysis.contract) over the whole registry, and the
broken encodings that it must catch: one that leaks later tokens, one that divides by the
length of the whole sequence (classic normalized without its refusal), one whose bias
has the wrong shape, one whose KV-cache decoding differs from its full forward."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import pytest
import torch

import posenc
from posenc.analysis.contract import CHECKS, check_encoding
from posenc.encodings.bias import AlibiParams

#: Encodings with a documented contract failure, each asserted to still fail exactly
#: these checks (a fix must update this table). None: normalized is built causally with a
#: fixed length (its example_params), and length=None is refused in a causal model.
KNOWN_FAILURES: dict[str, set[str]] = {}


@pytest.mark.parametrize("name", posenc.available())
def test_registered_encodings_keep_the_contract(name):
    results = check_encoding(name)
    assert [r.check for r in results] == list(CHECKS)
    failed = {r.check: r.detail for r in results if not r.passed}
    assert set(failed) == KNOWN_FAILURES.get(name, set()), failed


@dataclasses.dataclass(frozen=True)
class DimParams(posenc.Params):
    dim: int

    def validate(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")


class LeaksFuture(posenc.PositionalEncoding):
    """Adds the mean of all hidden states of the sequence: every token sees later ones."""

    name = "test-leaks-future"
    Params: ClassVar[type[posenc.Params]] = DimParams

    def embed(self, x, positions):
        return x + x.mean(dim=1, keepdim=True)


class WholeSequenceLength(posenc.AdditiveEncoding):
    """Classic normalized without the refusal: each row divided by its own last index,
    so every position's vector depends on how many tokens follow it."""

    name = "test-whole-sequence-length"
    Params: ClassVar[type[posenc.Params]] = DimParams

    def table(self, positions):
        return posenc.functional.normalized_table(positions, self.params.dim).float()


class HeadlessBias(posenc.PositionalEncoding):
    """A distance bias without its head axis: ``[s_q, s_k]`` instead of ``[h, s_q, s_k]``."""

    name = "test-headless-bias"
    Params: ClassVar[type[posenc.Params]] = AlibiParams

    def bias(self, q_positions, k_positions, *, q=None, k=None):
        return -(q_positions[:, None] - k_positions[None, :]).abs().float()

    def score_mod(self, q_positions, k_positions, *, q=None, k=None):
        return None


class ChunkRelative(posenc.PositionalEncoding):
    """Rotates by positions counted from the start of each call's chunk, not the
    sequence: right for a full forward, wrong for every cached decoding step."""

    name = "test-chunk-relative"
    Params: ClassVar[type[posenc.Params]] = DimParams

    def embed(self, x, positions):
        chunk = torch.arange(x.shape[1], dtype=x.dtype)[:, None]  # [s, 1]: restarts at 0 each call
        return x + torch.sin(chunk / (1 + torch.arange(x.shape[-1], dtype=x.dtype)))


@pytest.mark.parametrize(
    "cls,check,match",
    [
        (LeaksFuture, "causality", "appending 4 tokens to 8 changed the logits"),
        (WholeSequenceLength, "causality", "appending 4 tokens to 8 changed the logits"),
        (HeadlessBias, "hooks", r"bias: expected \[h, s_q, s_k\]"),
        (ChunkRelative, "kv_cache", "decoding token 3 with the cache differs"),
    ],
)
def test_the_contract_catches_broken_encodings(cls, check, match):
    results = {r.check: r for r in check_encoding(cls)}
    assert not results[check].passed
    assert re.search(match, results[check].detail), results[check]


def test_unknown_check_and_bad_encoding_are_refused():
    with pytest.raises(ValueError, match="unknown checks.*causality"):
        check_encoding("rope", checks=("causalty",))
    with pytest.raises(TypeError, match="PositionalEncoding subclass"):
        check_encoding(int)
    with pytest.raises(ValueError, match="Did you mean 'rope'"):
        check_encoding("rop")


def test_translation_check_holds_rotary_claims_to_account():
    """rope2d does not claim translation invariance (a shift moves tokens across grid
    rows); a subclass that claims it fails the check, rope with a length-dependent rule
    drops the claim."""

    class ClaimsInvariance(posenc.get("rope2d")):
        translation_invariant = True

    (result,) = check_encoding(ClaimsInvariance, checks=("translation",))
    assert not result.passed and "shifting every position by" in result.detail
    assert posenc.create("rope", head_dim=8).translation_invariant
    dynamic = posenc.create("rope", head_dim=8, rope_type="dynamic", factor=2.0, max_len=16)
    assert not dynamic.translation_invariant


def test_normalized_passes_causality_and_its_classic_definition_is_refused_causally():
    """normalized with a fixed length keeps causality at every prefix, positions past the
    length included; without a length it cannot be built for a causal model, so every
    check reports the refusal."""
    for length in (128, 4):  # 4 < the 12-token sequence: values above 1 past position 3
        fixed = type("Fixed", (posenc.get("normalized"),), {"example_params": {"length": length}})
        assert all(r.passed for r in check_encoding(fixed)), check_encoding(fixed)
    classic = type("Classic", (posenc.get("normalized"),), {"example_params": {}})
    results = check_encoding(classic, checks=("causality", "kv_cache"))
    assert [r.passed for r in results] == [False, False]
    assert all("length=None" in r.detail and "causal model" in r.detail for r in results), results
