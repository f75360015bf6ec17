"""docs/architecture.md's layers, checked on the source: every ``posenc`` import (module
level and inside functions) points to a lower layer or stays inside its own package, no
two modules import each other through any chain, no file under src/ exceeds 500 lines,
and no module imports another module's private (``_name``) objects."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

#: Rank of each layer (docs/architecture.md, bottom to top). A module may import a module
#: of a lower rank, or one of its own layer; layers of equal rank never import each other.
LAYERS = {
    "posenc.functional": 0,
    "posenc.base": 1,
    "posenc.registry": 2,
    "posenc.encodings": 3,
    "posenc.flex": 4,
    "posenc.attention": 5,
    "posenc.model": 6,
    "posenc": 7,  # the package's public API (__init__): the core above
    "posenc.data": 7,
    "posenc.analysis": 8,
    "posenc.experiments": 8,
    "posenc.interop": 8,
    "posenc.viz": 9,
    "posenc.pipeline": 10,
    "posenc.cli_output": 11,
    "posenc.cli_diagnose": 12,  # a command's function, registered by posenc.cli
    "posenc.cli": 13,
}
#: Downward imports that the layers still refuse: viz draws plain tables and dataclasses
#: and never runs or reads experiments (the pipeline passes it their results).
FORBIDDEN = {("posenc.viz", "posenc.experiments")}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted((SRC / "posenc").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(target module, imported names, line)`` for every posenc import of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "posenc"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "posenc":
                continue
            names = [a.name for a in node.names]
            # `from posenc.viz import figures` imports the module posenc.viz.figures
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(m, [], node.lineno) for m in submodules]
            objects = [n for n in names if f"{base}.{n}" not in MODULES]
            if objects or not submodules:
                found.append((base, objects, node.lineno))
    return [(_resolve(t), names, line) for t, names, line in found if _resolve(t)]


def _layer(module: str) -> str:
    return module if module == "posenc" else ".".join(module.split(".")[:2])


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            # a package's __init__ re-exports its own modules: not an edge of the graph
            if target != m and not (MODULES[target].name == "__init__.py" and m.startswith(target + ".")):
                edges[m].add(target)
    return edges


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(LAYERS), sorted({_layer(m) for m in MODULES} - set(LAYERS))


def test_imports_point_downward():
    upward = []
    for m in MODULES:
        for target, _, line in _imports(m):
            a, b = _layer(m), _layer(target)
            if a != b and (LAYERS[b] >= LAYERS[a] or (a, b) in FORBIDDEN):
                upward.append(f"{MODULES[m].relative_to(SRC)}:{line} imports {target}")
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_edges()) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_across_modules():
    private = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {', '.join(n for n in names if n.startswith('_'))} from {t}"
        for m in MODULES
        for t, names, line in _imports(m)
        if t != m and any(n.startswith("_") for n in names)
    ]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_under_500_lines(module):
    assert len(MODULES[module].read_text(encoding="utf-8").splitlines()) <= 500


@pytest.mark.parametrize(
    "page,section", [("architecture.md", "## RoPE scaling rules"), ("rotary.md", "## Adding a scaling rule")]
)
def test_the_documented_new_scaling_rule_runs(page, section, monkeypatch):
    """The docs' "a new rule is one function plus one table entry" example, executed."""
    import re

    import posenc
    from posenc.functional import rope_scaling

    monkeypatch.setattr(rope_scaling, "SCALING_RULES", dict(rope_scaling.SCALING_RULES))
    text = (SRC.parent / "docs" / page).read_text(encoding="utf-8")
    code = re.search(re.escape(section) + r".*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, f"docs/{page}", "exec"), {})
    inv_freq, factor = posenc.rope_frequencies(64, {"rope_type": "power", "factor": 4.0, "power": 0.5})
    plain, _ = posenc.rope_frequencies(64, {"rope_type": "default"})
    assert factor == 1.0
    assert inv_freq.tolist() == pytest.approx((plain / 2.0).tolist(), rel=1e-12)  # 4 ** 0.5
