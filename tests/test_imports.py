"""How the library's modules depend on each other: no import cycles, and the adapters apart.

Read from the source with ``ast``, not by importing: every import statement counts, at module level,
inside functions and under ``if TYPE_CHECKING:`` (a type-only cycle is still two modules that each
need the other to be understood). ``import a.b`` and ``from a import b`` depend on the most specific
module of the package they name (``a.b`` when it is a module, else ``a``); the implicit import of a
package's ``__init__`` that every submodule import runs is not counted, so a package may re-export
its submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "inrun_megatron"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The package module ``dotted`` names, or lies in (``pkg.mod.Name`` -> ``pkg.mod``); None outside."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding this module
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            found.update(_resolve(f"{base}.{alias.name}", modules) for alias in node.names)
    return {m for m in found if m is not None and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None if it is acyclic."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for successor in sorted(graph[node]):
            if successor in on_path:
                return [*path[path.index(successor) :], successor]
            if successor not in done:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_type_only_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from inrun_megatron.scorer import Scorer\n"
    )
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree)), "ast.walk sees type-only imports"


def test_the_library_has_no_import_cycles():
    graph = import_graph()
    assert "inrun_megatron.scorer" in graph and graph["inrun_megatron.megatron.scorer"], "the graph was read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_neither_adapter_imports_the_other():
    def adapter(module: str) -> str | None:
        for name in ("megatron", "deepspeed"):
            package = f"inrun_megatron.{name}"
            if module == package or module.startswith(package + "."):
                return name
        return None

    crossing = [
        f"{module} imports {imported}"
        for module, imports in import_graph().items()
        for imported in imports
        if adapter(module) and adapter(imported) and adapter(module) != adapter(imported)
    ]
    assert not crossing, crossing
