"""The registry: encodings by name.

posenc.available()             # sorted list of names
posenc.create("alibi", num_heads=8)
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from posenc.base import PositionalEncoding
from posenc.functional.checks import did_you_mean

_REGISTRY: dict[str, type[PositionalEncoding]] = {}

T = TypeVar("T", bound=type[PositionalEncoding])


def register(cls: T) -> T:
    """Class decorator: register an encoding under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name to register under")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an encoding named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Sorted names of every registered encoding."""
    return sorted(_REGISTRY)


def get(name: str) -> type[PositionalEncoding]:
    """The encoding class registered as ``name``; unknown names list the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        names = available()
        raise ValueError(f"unknown encoding {name!r}; available: {names}.{did_you_mean(name, names)}")
    return _REGISTRY[name]


def create(name: str, **params: Any) -> PositionalEncoding:
    """Build the encoding ``name`` with validated ``params``.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for an unknown
    parameter, each listing the valid choices with a close-match suggestion.
    """
    return get(name)(**params)


def parameter_names(name: str) -> list[str]:
    """The parameter names of encoding ``name``, in declaration order."""
    return [f.name for f in dataclasses.fields(get(name).Params)]


def create_for_model(
    name: str,
    params: dict[str, Any] | None = None,
    **dims: Any,
) -> PositionalEncoding:
    """Build ``name`` for a model: size parameters the encoding declares (``dim``,
    ``num_heads``, ``head_dim``, ``max_len``, ...) that the caller did not set in
    ``params`` are filled from ``dims``; entries of ``dims`` the encoding does not take,
    or that are ``None``, are ignored."""
    params = dict(params or {})
    accepted = parameter_names(name)
    for key, value in dims.items():
        if key in accepted and key not in params and value is not None:
            params[key] = value
    return create(name, **params)


def create_example(name: str, **dims: Any) -> PositionalEncoding:
    """Build ``name`` for demos, analysis and registry-wide tests: the encoding's
    ``example_params`` plus the size parameters from ``dims`` (as ``create_for_model``)."""
    return create_for_model(name, dict(get(name).example_params), **dims)
