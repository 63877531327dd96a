"""The package's import graph: no cycles, each layer imports only the layers below it, the package
never imports the recipes beside it, and the generate command does not pay for torch's compiler."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import idefics2

PACKAGE = Path(idefics2.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` in the file may refer to (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the idefics2 modules it imports anywhere (inside functions too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {c for c in imported_names(path) if c in modules and c != name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


# Layer -> what it may import besides itself. The layers above (modeling, serving, finetune, cli)
# are kept acyclic by the test above.
BELOW = {
    "idefics2.files": (),
    "idefics2.shard_files": (),
    "idefics2.config_checks": (),
    "idefics2.config": ("idefics2.config_checks",),
    "idefics2.model": ("idefics2.config",),
    "idefics2.processing": ("idefics2.files",),
    "idefics2.checkpoint": ("idefics2.config", "idefics2.files", "idefics2.shard_files", "idefics2.model"),
    "idefics2.generation": ("idefics2.config", "idefics2.model"),
}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    for module, targets in import_graph().items():
        for layer, below in BELOW.items():
            if module == layer or module.startswith(layer + "."):
                allowed = (layer, *below)
                above = sorted(t for t in targets if t != "idefics2"
                               and not any(t == a or t.startswith(a + ".") for a in allowed))
                assert not above, f"{module} imports {above}, above its layer"


def test_the_package_never_imports_the_recipes() -> None:
    for path in PACKAGE.rglob("*.py"):
        recipes = sorted(n for n in imported_names(path) if n == "recipes" or n.startswith("recipes."))
        assert not recipes, f"{path.relative_to(PACKAGE.parent)} imports {recipes}"


def test_generate_does_not_import_the_compiler() -> None:
    code = ("import sys; from idefics2.cli import main; "
            "main(['generate', '--max-new-tokens', '2', 'Hi']); "
            "print('torch._dynamo' in sys.modules, 'recipes.shapes_vqa.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]


def test_files_and_functions_stay_small() -> None:
    """At most 400 lines a module and 100 a function: past that a module holds two concerns."""
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE.parent)
        assert len(source.splitlines()) <= 400, f"{name} has {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                assert length <= 100, f"{name}: {node.name} has {length} lines"
