"""Plugins: an encoding defined outside posenc, registered through POSENC_PLUGINS (a
file or a module), ``load_plugins`` and an installed package's entry point; failures
name the plugin; a name clash is refused. Each case runs in a fresh interpreter, since
the registry reads POSENC_PLUGINS and the entry points once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = textwrap.dedent(
    '''
    import dataclasses
    from typing import ClassVar

    import torch

    import posenc


    @dataclasses.dataclass(frozen=True)
    class HalfParams(posenc.Params):
        dim: int

        def validate(self):
            if not isinstance(self.dim, int) or self.dim < 1:
                raise ValueError(f"dim must be a positive int, got {self.dim!r}")


    @posenc.register
    class HalfPositions(posenc.AdditiveEncoding):
        """Every position p adds p / 2 to each dimension (a test plugin)."""

        name = "NAME"
        family = "additive"
        reference = "a test plugin"
        formula = "PE(p, i) = p / 2"
        Params: ClassVar[type[posenc.Params]] = HalfParams

        def table(self, positions):
            return (positions.double()[..., None] / 2).expand(*positions.shape, self.params.dim).float()
    '''
)


def _run(code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "POSENC_PLUGINS"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, cwd=tmp_path)


def _write_plugin(folder, module: str, name: str) -> None:
    (folder / f"{module}.py").write_text(PLUGIN.replace("NAME", name))


def test_plugin_file_and_module_from_the_environment(tmp_path):
    _write_plugin(tmp_path, "half_file", "half-file")
    _write_plugin(tmp_path, "half_module", "half-module")
    code = (
        "import posenc, torch; print(posenc.available()); "
        "print(posenc.create('half-file', dim=2).table(torch.arange(3)).tolist())"
    )
    done = _run(code, tmp_path, POSENC_PLUGINS=f"{tmp_path / 'half_file.py'}:half_module", PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr
    names, table = done.stdout.splitlines()
    assert "half-file" in names and "half-module" in names and "rope" in names
    assert table == "[[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]"


def test_nothing_is_imported_unless_named(tmp_path):
    _write_plugin(tmp_path, "half_module", "half-module")
    done = _run(
        "import posenc, sys; print('half-module' in posenc.available(), 'half_module' in sys.modules)", tmp_path
    )
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_load_plugins_registers_and_is_idempotent(tmp_path):
    _write_plugin(tmp_path, "half_file", "half-call")
    path = tmp_path / "half_file.py"
    code = f"import posenc; print(posenc.load_plugins([{str(path)!r}])); print(posenc.load_plugins([{str(path)!r}]))"
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == f"{{{str(path)!r}: ['half-call']}}" and second == first


@pytest.mark.parametrize(
    "source,match",
    [
        ("raise RuntimeError('boom')", r"plugin '.*broken\.py' failed to import: RuntimeError: boom"),
        (
            PLUGIN.replace("NAME", "rope"),
            r"plugin '.*broken\.py' failed to import: ValueError: an encoding named 'rope' is already registered",
        ),
    ],
)
def test_broken_or_clashing_plugin_is_named(tmp_path, source, match):
    (tmp_path / "broken.py").write_text(source)
    done = _run("import posenc; posenc.available()", tmp_path, POSENC_PLUGINS=str(tmp_path / "broken.py"))
    assert done.returncode != 0
    assert "PluginError" in done.stderr
    import re

    assert re.search(match, done.stderr), done.stderr[-2000:]


def test_missing_plugin_file_is_named(tmp_path):
    done = _run("import posenc; posenc.available()", tmp_path, POSENC_PLUGINS=str(tmp_path / "nope.py"))
    assert "plugin" in done.stderr and "nope.py" in done.stderr and "no such file" in done.stderr


def test_installed_entry_point(tmp_path):
    """A package installed with an entry point in the group ``posenc.encodings`` (its
    dist-info on sys.path, as pip leaves it) is registered without being named."""
    site = tmp_path / "site"
    site.mkdir()
    _write_plugin(site, "posenc_half", "half-installed")
    info = site / "posenc_half-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: posenc-half\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[posenc.encodings]\nhalf = posenc_half\n")
    done = _run("import posenc; print('half-installed' in posenc.available())", tmp_path, PYTHONPATH=str(site))
    assert done.stdout.strip() == "True", done.stderr
