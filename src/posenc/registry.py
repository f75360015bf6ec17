"""The registry: encodings by name, built in or plugged in.

posenc.available()             # sorted list of names
posenc.create("alibi", num_heads=8)

Plugins: an encoding defined outside posenc (a class decorated with ``posenc.register``)
is registered by importing the module that defines it, from

* ``POSENC_PLUGINS``: paths of ``.py`` files or module names, separated by ``:``;
* ``load_plugins([...])`` (the CLI's ``--plugin`` option);
* installed packages that declare an entry point in the group ``posenc.encodings``.

They are imported on the first ``available()``/``get()``, once; nothing else is
imported. A plugin that fails to import, or registers a name that is taken, raises
``PluginError`` naming the plugin and the cause.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import sys
from typing import Any, TypeVar

from posenc.base import PositionalEncoding
from posenc.functional.checks import did_you_mean

_REGISTRY: dict[str, type[PositionalEncoding]] = {}
PLUGIN_ENV = "POSENC_PLUGINS"
ENTRY_POINT_GROUP = "posenc.encodings"
#: Plugin specs imported so far (a path or module name -> the names it registered).
LOADED_PLUGINS: dict[str, list[str]] = {}
_plugins_pending = True  # POSENC_PLUGINS and the entry points, read on first use


class PluginError(ValueError):
    """A plugin could not be imported or registered; the message names it."""


T = TypeVar("T", bound=type[PositionalEncoding])


def register(cls: T) -> T:
    """Class decorator: register an encoding under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name to register under")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        taken = _REGISTRY[cls.name]
        raise ValueError(
            f"an encoding named {cls.name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
            f"{cls.__module__}.{cls.__qualname__} needs another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _import_plugin(spec: str) -> None:
    path = pathlib.Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise FileNotFoundError(f"no such file {str(path)!r}")
        module_name = f"posenc_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    else:
        importlib.import_module(spec)


def load_plugin(spec: str) -> list[str]:
    """Import the plugin ``spec`` (a ``.py`` path or a module name) once; return the
    encoding names it registered."""
    if spec in LOADED_PLUGINS:
        return LOADED_PLUGINS[spec]
    before = set(_REGISTRY)
    try:
        _import_plugin(spec)
    except Exception as err:
        raise PluginError(f"plugin {spec!r} failed to import: {type(err).__name__}: {err}") from err
    LOADED_PLUGINS[spec] = sorted(set(_REGISTRY) - before)
    return LOADED_PLUGINS[spec]


def load_plugins(specs: list[str] | None = None) -> dict[str, list[str]]:
    """Import ``specs`` and, on the first call, the plugins named in ``POSENC_PLUGINS``
    and the ``posenc.encodings`` entry points of installed packages. Returns
    ``{spec: registered names}`` of this call's plugins."""
    global _plugins_pending
    pending: list[str] = list(specs or [])
    entry_points = []
    if _plugins_pending:
        _plugins_pending = False
        pending = [s for s in os.environ.get(PLUGIN_ENV, "").split(":") if s.strip()] + pending
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    loaded = {spec: load_plugin(spec.strip()) for spec in pending}
    for entry in entry_points:
        key = f"{entry.value} (entry point {entry.name!r})"
        if key in LOADED_PLUGINS:
            continue
        before = set(_REGISTRY)
        try:
            entry.load()
        except Exception as err:
            raise PluginError(f"plugin {key} failed to import: {type(err).__name__}: {err}") from err
        loaded[key] = LOADED_PLUGINS[key] = sorted(set(_REGISTRY) - before)
    return loaded


def plugin_specs() -> list[str]:
    """The plugins imported so far that another process must be told about: the ``.py``
    paths and module names of ``POSENC_PLUGINS`` and ``load_plugins`` (entry points are
    found by every process on its own). ``posenc study --jobs`` passes them to its worker
    processes, which call ``load_plugins`` with them."""
    return [spec for spec in LOADED_PLUGINS if " (entry point " not in spec]


def _with_plugins() -> dict[str, type[PositionalEncoding]]:
    if _plugins_pending:
        load_plugins()
    return _REGISTRY


def available() -> list[str]:
    """Sorted names of every registered encoding (plugins included)."""
    return sorted(_with_plugins())


def get(name: str) -> type[PositionalEncoding]:
    """The encoding class registered as ``name``; unknown names list the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _with_plugins():
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
