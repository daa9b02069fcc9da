"""The static checks the test command runs: types, lint, import layering, module size.

They are part of ``./dev.sh test`` so a change that breaks one fails the suite the
same way a behaviour change does. Each failure says what is wrong and where:
mypy's and ruff's own output, the import cycle with the line of every import in
it, the modules over the size limit with their line counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "compatfs"
#: A module longer than this is doing more than one thing (README: one concept, one place).
MAX_MODULE_LINES = 500


def _is_generated(path: Path) -> bool:
    """protoc's modules (compatfs/proto/*_pb2.py): written by a tool, not held to our rules."""
    return path.name.endswith("_pb2.py")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# -- mypy and ruff -------------------------------------------------------------

def test_mypy_strict_on_the_package_is_clean(tmp_path: Path) -> None:
    """``[tool.mypy]`` in pyproject.toml: strict on compatfs (generated protobuf aside)."""
    proc = _run("mypy", "--cache-dir", str(tmp_path / "mypy-cache"))
    if proc.returncode != 0:
        pytest.fail(f"mypy (strict, see [tool.mypy] in pyproject.toml) found errors in "
                    f"compatfs; exit {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)


def test_ruff_is_clean() -> None:
    """``[tool.ruff]`` in pyproject.toml, over the package, the tests and the benchmarks."""
    proc = _run("ruff", "check", "--no-cache", "--output-format", "concise",
                "compatfs", "tests", "bench")
    if proc.returncode != 0:
        pytest.fail(f"ruff check compatfs tests bench found problems (those marked [*] are "
                    f"fixed by `ruff check --fix`); exit {proc.returncode}:\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)


# -- the import graph ----------------------------------------------------------

@dataclass(frozen=True)
class Import:
    """One import statement of a compatfs module naming another compatfs module."""

    target: str
    path: Path
    line: int
    where: str  # "", "under TYPE_CHECKING" or "inside a function"

    def __str__(self) -> str:
        rel = self.path.relative_to(REPO)
        return f"{rel}:{self.line}" + (f" ({self.where})" if self.where else "")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _placed_imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in *tree*, at any depth, with where it sits."""
    out: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, where))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, "under TYPE_CHECKING")
            for stmt in node.orelse:
                visit(stmt, where)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            where = where or "inside a function"
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, "")
    return out


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: dict[str, Path]) -> list[str]:
    """The compatfs modules *node*, in module *name*, imports."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return [_existing(base, modules) for base in bases if base.split(".")[0] == "compatfs"]
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "compatfs":
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else _existing(base, modules))
    return out


def _existing(dotted: str, modules: dict[str, Path]) -> str:
    """*dotted*, or the nearest package above it that exists (a name inside a module)."""
    while dotted not in modules and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def import_graph() -> dict[str, dict[str, Import]]:
    """module -> {imported module: the first import of it}, from every module's AST."""
    modules = _modules()
    graph: dict[str, dict[str, Import]] = {}
    for name, path in modules.items():
        edges: dict[str, Import] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, where in _placed_imports(tree):
            for target in _targets(name, path.name == "__init__.py", node, modules):
                if target != name and target in modules:
                    edges.setdefault(target, Import(target, path, node.lineno, where))
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: every component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, dict[str, Import]], component: list[str]) -> list[Import]:
    """One loop through the first module of *component*, as the imports that make it."""
    members = set(component)
    start = component[0]
    # breadth first from start, inside the component, until an import leads back to start
    came_from: dict[str, tuple[str, Import]] = {}
    frontier = [start]
    while frontier and start not in came_from:
        following = []
        for node in frontier:
            for target, imp in sorted(graph[node].items()):
                if target in members and target not in came_from:
                    came_from[target] = (node, imp)
                    following.append(target)
        frontier = following
    loop: list[Import] = []
    node = start
    while not loop or node != start:
        node, imp = came_from[node]
        loop.append(imp)
    loop.reverse()
    return loop


def describe(graph: dict[str, dict[str, Import]], component: list[str]) -> str:
    cycle = a_cycle(graph, component)
    chain = " -> ".join([cycle[-1].target] + [f"{imp.target} [{imp}]" for imp in cycle])
    return (f"import cycle among {len(component)} modules ({', '.join(component)}); "
            f"one of its loops: {chain}")


def test_the_import_graph_has_no_cycle() -> None:
    """No cycle, counting imports under TYPE_CHECKING and inside functions too:
    a lower layer never imports a higher one, not even for a type."""
    graph = import_graph()
    cycles = [describe(graph, component) for component in strongly_connected(graph)]
    if cycles:
        pytest.fail("\n".join(cycles), pytrace=False)


#: The only product modules that may use the test and demo helpers: the demo builds
#: its device with them.
DEMO_MODULES = frozenset({"compatfs.demo", "compatfs.cli.demo"})


def test_only_the_demo_uses_the_test_helpers() -> None:
    """compatfs.testing builds devices for tests, benchmarks and the demo; the
    product (the daemon, the migration, the commands) never depends on it."""
    graph = import_graph()
    wrong = [str(imp) for name, edges in graph.items()
             if not name.startswith("compatfs.testing") and name not in DEMO_MODULES
             for target, imp in edges.items() if target.startswith("compatfs.testing")]
    if wrong:
        pytest.fail("product modules import compatfs.testing:\n" + "\n".join(wrong),
                    pytrace=False)


def test_the_cycle_finder_finds_cycles_and_reads_every_kind_of_import(tmp_path: Path) -> None:
    """The finder itself: a loop through TYPE_CHECKING and a function-local import is seen."""
    modules = {"compatfs": tmp_path / "__init__.py", "compatfs.a": tmp_path / "a.py",
               "compatfs.b": tmp_path / "b.py", "compatfs.c": tmp_path / "c.py"}
    a = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n")
    b = ast.parse("def f():\n    from compatfs import c\n")
    c = ast.parse("import compatfs.a.thing\nfrom . import names_in_init\n")
    seen = {name: [(target, where) for node, where in _placed_imports(tree)
                   for target in _targets(name, False, node, modules)]
            for name, tree in (("compatfs.a", a), ("compatfs.b", b), ("compatfs.c", c))}
    assert seen == {"compatfs.a": [("compatfs.b", "under TYPE_CHECKING")],
                    "compatfs.b": [("compatfs.c", "inside a function")],
                    "compatfs.c": [("compatfs.a", ""), ("compatfs", "")]}, seen
    graph = {name: {t: Import(t, tmp_path / "x.py", 1, w) for t, w in edges}
             for name, edges in seen.items()}
    graph["compatfs"] = {}
    assert strongly_connected(graph) == [["compatfs.a", "compatfs.b", "compatfs.c"]]
    loop = a_cycle(graph, ["compatfs.a", "compatfs.b", "compatfs.c"])
    assert [imp.target for imp in loop] == ["compatfs.b", "compatfs.c", "compatfs.a"], loop


# -- module size ---------------------------------------------------------------

def test_no_module_is_over_the_size_limit() -> None:
    """Counted as ``wc -l`` counts; protoc's generated modules excepted."""
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _is_generated(path):
            continue
        lines = path.read_bytes().count(b"\n")
        if lines > MAX_MODULE_LINES:
            over.append(f"{path.relative_to(REPO)}: {lines} lines")
    if over:
        pytest.fail(f"modules over {MAX_MODULE_LINES} lines (split each by what it owns):\n"
                    + "\n".join(over), pytrace=False)
