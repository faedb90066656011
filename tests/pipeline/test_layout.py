"""The pipeline's layout shows its flow: inputs and output know nothing of modes, and no import circles.

Checked on the source (every ``import`` statement, those inside functions too), so that a lazy
import cannot hide a circle again.
"""
import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PIPELINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict:
    """module -> the pipeline modules it imports (``from pipeline.x import y`` counts y if it is a module)."""
    modules = {_module_name(p): p for p in PIPELINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                found |= submodules or {node.module}
        graph[name] = found - {name}
    return graph


def test_the_import_graph_of_pipeline_has_no_cycle():
    graph = _imports()
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            pytest.fail("import circle: " + " -> ".join(trail[trail.index(module):] + [module]))
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("package", ["pipeline.inputs", "pipeline.output"])
def test_inputs_and_output_never_import_the_modes_or_the_run(package):
    graph = _imports()
    offenders = {module: sorted(t for t in targets if t.startswith(("pipeline.modes", "pipeline.run")))
                 for module, targets in graph.items() if module.startswith(package)}
    assert not {m: t for m, t in offenders.items() if t}


def test_the_pipeline_has_the_three_subpackages_and_each_mode_its_module():
    graph = _imports()
    for module in ("pipeline.inputs.read", "pipeline.output.sink", "pipeline.modes.automatic",
                   "pipeline.modes.prompted", "pipeline.modes.stage", "pipeline.modes.base"):
        assert module in graph
