"""The package's import graph: no cycles, the model and processing layers import nothing above them,
and the generate command does not pay for torch's compiler."""

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


def import_graph() -> dict[str, set[str]]:
    """Module -> the idefics2 modules it imports anywhere (inside functions too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


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


# `Idefics2ForConditionalGeneration.generate` delegates to the generation layer: the one upward import
# left; moving `generate` to a class above the model removes it (and this entry).
UPWARD = {("idefics2.model.idefics2", "idefics2.generation")}


def test_model_and_processing_import_nothing_above_them() -> None:
    graph = import_graph()
    allowed = {"idefics2.model": ("idefics2.model", "idefics2.config", "idefics2.checkpoint"),
               "idefics2.processing": ("idefics2.processing",)}
    for module, targets in graph.items():
        for layer, below in allowed.items():
            if module.startswith(layer + ".") or module == layer:
                above = sorted(t for t in targets if not t.startswith(below) and t != "idefics2"
                               and (module, t) not in UPWARD)
                assert not above, f"{module} imports {above}, above its layer"


def test_generate_does_not_import_the_compiler() -> None:
    code = ("import sys; from idefics2.cli import main; "
            "main(['generate', '--max-new-tokens', '2', 'Hi']); "
            "print('torch._dynamo' in sys.modules, 'idefics2.training.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]
