"""The package layering written once in the README ("Layout"), checked with ``ast``.

Every import in ``wmdd/``, ``baselines/`` and ``pipelines/`` (module level and inside
functions) must go to a package the README's import rules allow, and the project's
modules must import each other without a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wmdd", "baselines", "pipelines")


def import_rules(readme: str) -> dict[str, set[str]]:
    """``{layer: layers it may import}`` from the README's import-rules block."""
    block = re.search(r"<!-- import-rules: begin -->\n```\n(.*?)```", readme, re.S)
    assert block, "README.md has no import-rules block"
    rules: dict[str, set[str]] = {}
    for line in block.group(1).strip().splitlines():
        layer, _, allowed = line.partition("<-")
        names = {a.strip() for a in allowed.split(",") if a.strip()}
        rules[layer.strip()] = {n for n in names if not n.startswith("(")}
    return rules


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``wmdd.protocol.soft`` -> ``wmdd.protocol``; root modules -> ``wmdd``."""
    parts = module.split(".")
    if parts[0] != "wmdd":
        return parts[0]
    if len(parts) > 1 and (ROOT / "wmdd" / parts[1]).is_dir():
        return f"wmdd.{parts[1]}"
    return "wmdd"


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(source: str, package: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``source`` (a module of ``package``) imports, anywhere."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `from wmdd import paths` -> wmdd.paths
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for m, p in modules.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        graph[m] = imported_modules(p.read_text(), package, modules) - {m}
    return graph


def test_rules_cover_every_layer_and_form_a_dag() -> None:
    rules = import_rules((ROOT / "README.md").read_text())
    layers = {layer_of(m) for m in project_modules()}
    assert layers == set(rules), f"layers in the code {sorted(layers)} vs README {sorted(rules)}"
    for layer, allowed in rules.items():
        assert allowed <= set(rules), f"{layer}: unknown layers {allowed - set(rules)}"
    # The allowed edges themselves must be acyclic (a partial order).
    state: dict[str, int] = {}

    def visit(layer: str, path: list[str]) -> None:
        assert state.get(layer) != 1, f"cycle in the README's rules: {' -> '.join(path)}"
        if state.get(layer) == 2:
            return
        state[layer] = 1
        for dep in rules[layer]:
            visit(dep, [*path, dep])
        state[layer] = 2

    for layer in rules:
        visit(layer, [layer])


def test_every_import_is_allowed() -> None:
    rules = import_rules((ROOT / "README.md").read_text())
    violations = [
        f"{mod} ({layer_of(mod)}) imports {dep} ({layer_of(dep)})"
        for mod, deps in import_graph().items()
        for dep in deps
        if layer_of(dep) != layer_of(mod) and layer_of(dep) not in rules[layer_of(mod)]
    ]
    assert not violations, "imports the README's layout forbids:\n" + "\n".join(violations)


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph()
    # A package's __init__ importing its own submodules is not a cycle of concern.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 1:
            pytest.fail("import cycle: " + " -> ".join(path))
        if state.get(mod) == 2:
            return
        state[mod] = 1
        for dep in sorted(edges[mod]):
            visit(dep, [*path, dep])
        state[mod] = 2

    for mod in sorted(edges):
        visit(mod, [mod])


def test_checker_sees_forbidden_imports() -> None:
    """The checker itself can fail: upward imports in a protocol module, one of them inside
    a function and one relative, are all found and refused."""
    rules = import_rules((ROOT / "README.md").read_text())
    src = (
        "from wmdd.method.distill import wmdd_loss\n"
        "from ..synthesis import loop\n"
        "def f():\n    import baselines.dm\n"
    )
    deps = imported_modules(src, "wmdd.protocol", project_modules())
    bad = {d for d in deps if layer_of(d) not in rules["wmdd.protocol"] | {"wmdd.protocol"}}
    assert bad == {"wmdd.method.distill", "wmdd.synthesis", "wmdd.synthesis.loop", "baselines.dm"}
