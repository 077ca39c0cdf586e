"""The file tree is the architecture: each layer imports only the layers below it, and no modules import each
other in a circle (lazy imports inside functions count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmcli"
# a module may import its own layer and the ones after it in this list, never one before
LAYERS = [("cli", "__main__"), ("api",), ("infer", "train", "eval"), ("formats",), ("model", "text"),
          ("files", "config", "errors", "progress", "report", "runtime", "__init__")]


def imports() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmcli"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("llmcli")}
        graph[name] = {m for m in found if m in modules or f"{m}.__init__" in modules} - {name}
    return graph


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_every_import_points_down():
    upward = [(m, n) for m, targets in imports().items() for n in targets if layer(n) < layer(m)]
    assert not upward, f"imports of a higher layer: {upward}"


def test_no_import_circles():
    graph = {m: {n.removesuffix(".__init__") for n in targets} for m, targets in imports().items()}
    graph = {m.removesuffix(".__init__"): targets - {m.removesuffix(".__init__")} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph.get(m, ()):
            assert state.get(n) != 1, f"import circle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_model_module_tunes_the_machine():
    """Threads, OpenMP and the allocator are the runtime's (llmcli/runtime.py), set by commands and long loops: a
    forward pass never changes the process's threads, so a model's results never depend on its neighbours."""
    tuning = [m for m, targets in imports().items() if m.startswith("llmcli.model.") and "llmcli.runtime" in targets]
    assert not tuning, f"modules under model/ importing the runtime: {tuning}"
