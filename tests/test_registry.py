"""The registry and parameter validation (bad input names the argument)."""

import dataclasses

import pytest

import posenc

ABSOLUTE = ["binary", "integer", "learned", "none", "normalized", "sine", "sinusoidal"]
# Every encoding the project ships. Many tests are parametrized over posenc.available(),
# so losing one would shrink them silently: this list makes it a failure.
SHIPPED = [
    *ABSOLUTE,
    "alibi",
    "cope",
    "fire",
    "kerple",
    "proportional",
    "rope",
    "rope2d",
    "sandwich",
    "shaw",
    "t5",
    "xpos",
]


def test_available_is_sorted_and_has_the_absolute_family():
    names = posenc.available()
    assert names == sorted(names)
    assert set(ABSOLUTE) <= set(names)


def test_every_shipped_encoding_is_registered():
    assert posenc.available() == sorted(SHIPPED)


def test_unknown_name_lists_valid_ones_and_suggests():
    with pytest.raises(ValueError, match=r"unknown encoding 'sinusodal'.*Did you mean 'sinusoidal'"):
        posenc.create("sinusodal", dim=4)
    with pytest.raises(ValueError, match="available: \\[.*'binary'"):
        posenc.create("zzz")
    with pytest.raises(TypeError, match="name must be a str"):
        posenc.create(3)


def test_unknown_parameter_lists_valid_ones_and_suggests():
    match = r"no parameter 'bse'; valid parameters: \['dim', 'base'\]\. Did you mean 'base'"
    with pytest.raises(TypeError, match=match):
        posenc.create("sinusoidal", dim=4, bse=10.0)


def test_missing_required_parameter():
    with pytest.raises(TypeError, match=r"needs parameter\(s\) \['dim'\]"):
        posenc.create("integer")


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("integer", {"dim": 0}, "dim must be > 0, got 0"),
        ("integer", {"dim": -3}, "dim must be > 0, got -3"),
        ("integer", {"dim": 2.5}, "dim must be an int, got 2.5"),
        ("integer", {"dim": True}, "dim must be an int"),
        ("sinusoidal", {"dim": 5}, "dim must be even"),
        ("sinusoidal", {"dim": 4, "base": 1.0}, "base must be > 1.0"),
        ("sinusoidal", {"dim": 4, "base": float("nan")}, "base must be finite"),
        ("sine", {"dim": 4, "min_period": 2}, "min_period must be >= 3"),
        ("sine", {"dim": 4, "ratio": 1}, "ratio must be >= 2"),
        ("sine", {"dim": 1200}, "exceed float64"),
        ("learned", {"dim": 4, "max_len": 0}, "max_len must be > 0"),
        ("learned", {"dim": 4, "init_std": -1.0}, "init_std must be >= 0.0"),
        ("normalized", {"dim": 4, "length": 0}, "length must be > 0"),
    ],
)
def test_bad_parameter_values_name_the_parameter(name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        posenc.create(name, **params)


def test_params_are_frozen_dataclasses():
    pe = posenc.create("sinusoidal", dim=8)
    assert dataclasses.is_dataclass(pe.params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pe.params.dim = 16


def test_every_encoding_describes_itself():
    for name in posenc.available():
        cls = posenc.get(name)
        assert cls.name == name
        assert cls.family and cls.reference and cls.formula, name
        assert cls.__doc__ and "Formula" in cls.__doc__ or cls.family != "additive", name


def test_register_rejects_a_second_class_under_the_same_name():
    class Dup(posenc.PositionalEncoding):
        name = "integer"

    with pytest.raises(ValueError, match="already registered"):
        posenc.register(Dup)
