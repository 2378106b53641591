"""The package's shape: imports run one way (no module imports a module that imports it back),
and the layers keep their order: loaders -> augment -> kernels, data at the bottom.

The import graph is read from the source (ast), so imports inside functions count too. An
import of `a.b.c` is an edge to the module a.b.c only: Python runs the parent packages'
__init__ first, which is not a dependency of a.b.c on a.b.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastneg"


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the fastneg modules it imports anywhere in its source."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "fastneg.augment.cpu" in graph["fastneg.augment.mocov2"]   # imported inside a method
    assert "fastneg.loaders.common" in graph["fastneg.loaders"]     # inside build_loader


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("lower, upper", [
    ("fastneg.data", "fastneg.loaders"), ("fastneg.data", "fastneg.augment"),
    ("fastneg.kernels", "fastneg.augment"), ("fastneg.kernels", "fastneg.loaders"),
    ("fastneg.augment", "fastneg.loaders"),
])
def test_layers_import_downwards_only(lower, upper):
    graph = import_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items()
                   if m == lower or m.startswith(lower + ".")
                   for t in targets if t == upper or t.startswith(upper + "."))
    assert not wrong, wrong


def test_only_the_benchmarks_import_the_benchmarking_module():
    """fastneg.benchmarking sits on top: the benchmark scripts' shared code may import any of
    fastneg, and no module outside it imports it."""
    graph = import_graph()
    assert "fastneg.benchmarking.data" in graph          # the graph does see the package
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items()
                   if m != "fastneg.benchmarking" and not m.startswith("fastneg.benchmarking.")
                   for t in targets
                   if t == "fastneg.benchmarking" or t.startswith("fastneg.benchmarking."))
    assert not wrong, wrong
