"""The library's modules import one another in one direction (no circle, even through
imports inside functions), and none uses a private name (`_x`) of another."""

import ast
import pathlib

import eqx_pmapstate


ROOT = pathlib.Path(eqx_pmapstate.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _modules() -> dict[str, tuple[pathlib.Path, ast.Module]]:
    return {
        _module_name(p): (p, ast.parse(p.read_text()))
        for p in sorted(ROOT.rglob("*.py"))
    }


def _imports(modules) -> dict[str, set[tuple[str, str | None]]]:
    """Per module: `(module imported, name taken from it or None)`, within the library."""
    out: dict[str, set] = {m: set() for m in modules}
    for name, (path, tree) in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            target = _resolve(name, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    out[name].add((sub, None))
                else:
                    out[name].add((target, alias.name))
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    modules = _modules()
    graph = {}
    for name, imported in _imports(modules).items():
        # A package's `__init__` re-exports its modules: importing the package from
        # one of its own modules would be the circle, and is counted.
        graph[name] = {m for m, _ in imported if m != name}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_private_name_of_another_module_is_used():
    modules = _modules()
    used = []
    for name, imported in _imports(modules).items():
        for module, symbol in imported:
            if symbol is not None and symbol.startswith("_") and module != name:
                used.append(f"{name} imports {symbol} from {module}")
    for name, (_, tree) in modules.items():
        imported_modules = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0
            for alias in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules
                and node.value.id.startswith("_")
                and node.attr.startswith("_")
            ):
                used.append(f"{name} uses {node.value.id}.{node.attr}")
    assert used == []


def test_the_pipeline_is_assembled_in_one_place():
    # Only the engine runs the steps in order; the callers call `compile_program`.
    modules = _modules()
    for name, (_, tree) in modules.items():
        called = {
            node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
        }
        steps = called & {"varying_outputs", "build", "trace"}
        if name != "eqx_pmapstate._engine":
            assert not steps & {"varying_outputs", "build"}, (name, steps)
