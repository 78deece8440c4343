"""The package's layering, read from the source: the algorithm depends on torch alone, and no two modules
import each other, even inside functions (a cycle hidden in a function is still a cycle to a reader)."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "esam_hf"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module `name` imports, at any depth of its code; relative imports resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return found


def _own(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {name: {m for m in map(_own, _imports(name)) if m and m != name} for name in MODULES}


def test_the_algorithm_depends_on_torch_and_the_standard_library_only():
    outside = {m.split(".")[0] for m in _imports("esam_hf.esam")} - {"torch", "__future__"}
    assert not outside - set(sys.stdlib_module_names), outside


def test_no_module_of_the_package_imports_itself_through_others():
    state, cycles = {}, []

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_graph_sees_imports_inside_functions():
    # a check of the checker: reproduce imports the benchmark only inside a function
    assert "esam_hf.benchmark" in GRAPH["esam_hf.reproduce"]
    assert {"esam_hf.run_folder.record", "esam_hf.run_folder.resume"} <= GRAPH["esam_hf.run_folder.claim"]
