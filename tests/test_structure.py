"""Rules of the code's structure, checked on the source with `ast` (nothing is imported).

- Serving never imports the trainer: no `import trainer...` / `from trainer...` anywhere under service/
  (module level, functions and `if TYPE_CHECKING:` blocks alike). tests/service/test_imports.py checks
  the same at run time for what `service.app` loads; this covers every module and every code path.
- No reach into another object's private attributes across modules (service/ and trainer/): an attribute
  access `x._name` (read or write; `_name` not a dunder) is allowed when
    * `x` is `self` or `cls`, or `super()` (a class and its subclasses share their protected members), or
    * `_name` is defined in the same module: a function, method or class of that name, a class-body
      assignment, or a `self._name = ...` / `cls._name = ...` assignment. A module's own helper class, or
      `other._name` inside `__eq__`, may use its private members; another module's may not.
    * it is a library idiom that is public API despite the underscore, listed in ALLOWED_PRIVATE.
  Not covered: `getattr(x, "_name")` and `from module import _name` (trainer.evaluate re-exports
  `_recall` on purpose; it is part of that module's `__all__`).
- No import cycle among service/ modules: the graph of module-level imports (also those in module-level
  `if`/`try`/`with` blocks and class bodies; not those in functions or in `if TYPE_CHECKING:` blocks) is
  acyclic. `from package import name` counts as importing `package.name` when that is a module, else the
  package's `__init__`; a submodule is not taken to import its parent packages (Python runs those first).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED_PACKAGES = ("service", "trainer")

ALLOWED_PRIVATE = {
    # underscore names that are documented public API of their library
    ("*", "_replace"), ("*", "_asdict"), ("*", "_fields"), ("*", "_make"),  # collections.namedtuple
    ("sys", "_getframe"),
    ("os", "_exit"),
    ("torch", "_C"),
    ("torch", "_dynamo"),
}
"""(receiver, attribute) pairs allowed anywhere; receiver "*" = any object (namedtuple methods)."""


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


# ---- serving does not import the trainer ---------------------------------------------------------------


def _all_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, is_package, node)
            yield node.lineno, target
            for alias in node.names:  # `from . import trainer`-like forms
                yield node.lineno, f"{target}.{alias.name}" if target else alias.name


def test_service_never_imports_the_trainer():
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in _sources("service")
        for line, name in _all_imports(path)
        if name == "trainer" or name.startswith("trainer.")
    ]
    assert not found, "serving must not import the offline trainer:\n" + "\n".join(found)


# ---- no private access across modules --------------------------------------------------------------------


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _private_names_defined(tree: ast.Module) -> set[str]:
    """Underscore names this module defines itself (see the module docstring)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                targets = (stmt.targets if isinstance(stmt, ast.Assign)
                           else [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return {n for n in names if n.startswith("_")}


def _own_receiver(value: ast.expr) -> bool:
    if isinstance(value, ast.Name) and value.id in ("self", "cls"):
        return True
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def private_access_violations(tree: ast.Module, where: str) -> list[str]:
    """`where:line: expression` of each access the rule forbids."""
    own = _private_names_defined(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or _is_dunder(node.attr):
            continue
        if _own_receiver(node.value) or node.attr in own:
            continue
        if ("*", node.attr) in ALLOWED_PRIVATE or (ast.unparse(node.value), node.attr) in ALLOWED_PRIVATE:
            continue
        out.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return out


@pytest.mark.parametrize("package", CHECKED_PACKAGES)
def test_no_private_attribute_access_across_modules(package):
    found = [violation for path in _sources(package)
             for violation in private_access_violations(_parse(path), str(path.relative_to(ROOT)))]
    assert not found, (
        "private attributes of objects defined in another module (use a public name, pass the value in, "
        "or add a library idiom to ALLOWED_PRIVATE):\n" + "\n".join(found)
    )


def test_the_private_access_rule_flags_only_a_reach_into_another_module():
    text = (
        "import sys\n"
        "class Box:\n"
        "    _slot = 1\n"
        "    def __init__(self, other, thread):\n"
        "        self._mine = other._mine + other._slot\n"  # names this module defines: allowed
        "        super()._setup()\n"
        "        sys._getframe(0)\n"
        "        other._replace(a=1)\n"
        "        thread._target\n"  # defined nowhere here: flagged
        "        thread._stash = self\n"  # writing one is a reach too
    )
    assert private_access_violations(ast.parse(text), "probe") == ["probe:9: thread._target", "probe:10: thread._stash"]


# ---- no import cycles in service/ ------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under `if TYPE_CHECKING:`."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _module_level_imports(stmt.body)
            yield from _module_level_imports(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from _module_level_imports(block)
        elif isinstance(stmt, (ast.With, ast.ClassDef)):
            yield from _module_level_imports(stmt.body)


def service_import_graph() -> dict[str, set[str]]:
    """service module -> the service modules its module-level imports load."""
    paths = {_module_name(p): p for p in _sources("service")}

    def known(name: str) -> str | None:  # the module itself, else the nearest enclosing one we have
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        edges: set[str] = set()
        for node in _module_level_imports(_parse(path).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_from(module, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            edges.update(t for t in map(known, targets) if t is not None and t.startswith("service") and t != module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_service_modules_import_no_cycle():
    graph = service_import_graph()
    assert "service.app" in graph and "service.storage.redis_store" in graph["service.storage.factory"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among service modules: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
