"""The package's layering: what may import what, and how large a module may grow."""

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "atlasfl"


def test_report_reads_runs_without_the_training_code():
    code = ("import sys, atlasfl.report; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
            "'atlasfl.engine', 'atlasfl.client', 'atlasfl.strategies', 'atlasfl.phases'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("package", ["phases", "strategies"])
def test_algorithms_never_reach_into_the_engine(package):
    for path in (SRC / package).glob("*.py"):
        imports = [line for line in path.read_text().splitlines()
                   if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in imports if "atlasfl.engine" in line
                    or "atlasfl.client" in line], path


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def test_the_engine_never_imports_the_report():
    for path in (SRC / "engine").rglob("*.py"):
        assert "atlasfl.report" not in path.read_text(), path


def _imports(path: Path) -> set[str]:
    """The atlasfl modules a module imports anywhere (type-checking and function bodies too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atlasfl"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("atlasfl"))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the atlasfl modules it imports (packages resolved to their __init__)."""
    modules = {".".join(("atlasfl", *p.relative_to(SRC).with_suffix("").parts))
               .removesuffix(".__init__"): p for p in SRC.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_cycles_are_found_and_none_remain():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    packages = {"atlasfl.config", "atlasfl.strategies", "atlasfl.client", "atlasfl.engine"}
    # a package's __init__ re-exports its modules; a module importing its own package's
    # __init__ would make every re-export a circle, so those edges are not followed
    graph = {m: {d for d in deps if not (d in packages and m.startswith(d + "."))}
             for m, deps in import_graph().items()}
    assert import_cycles(graph) == []


def test_the_config_names_every_method_of_the_registry():
    from atlasfl.errors import choices
    from atlasfl.strategies import METHODS
    from atlasfl.types import MethodName

    assert list(choices(MethodName)) == list(METHODS)


def test_no_strategy_class_inherits_deeper_than_base_to_part():
    import ast

    bases: dict[str, list[str]] = {}
    for path in (SRC / "strategies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
    for name, parents in bases.items():
        for parent in parents:
            assert not [p for p in bases.get(parent, []) if p in bases], (name, parent)
