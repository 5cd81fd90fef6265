"""The house rules: stages fast to import, no import circles, modules a newcomer can read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"flows": "tnflow.flows", "tasks": "tnflow.tasks"}
MODULES = {
    f"{PACKAGES[path.parent.name]}.{path.stem}": path
    for folder in PACKAGES
    for path in sorted((REPO / folder).glob("*.py"))
    if path.stem != "__init__"
}
# Only the model module (and the modules it alone imports: graph pieces, the compatibility
# module) may load TensorFlow.
TF_MODULES = {
    "tnflow.tasks.model",
    "tnflow.tasks.levers",
    "tnflow.tasks.decode_graph",
    "tnflow.tasks.tensornets_compat",
}


@pytest.mark.slow
def test_only_the_model_module_imports_tensorflow():
    """Imports every other module in one fresh process, checking after each one."""
    probe = (
        "import importlib, sys\n"
        f"for name in {sorted(set(MODULES) - TF_MODULES)!r}:\n"
        "    importlib.import_module(name)\n"
        "    if {'tensorflow', 'tensornets'} & set(sys.modules):\n"
        "        print(name)\n"
        "        break\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"{done.stdout.strip()} imports TensorFlow (only tasks/model.py may)"


def imports_of(path: Path) -> set[str]:
    """Every tnflow module `path` imports, at the top or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in MODULES}
    return found


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (circle := visit(nxt, [*path, nxt])):
                return circle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_no_import_circles():
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_the_circle_finder_finds_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_settings_and_the_zoo_table_are_leaves():
    """The configuration needs the zoo's model names; neither needs anything that does work."""
    assert imports_of(MODULES["tnflow.tasks.settings"]) <= {"tnflow.tasks.errors", "tnflow.tasks.backbones"}
    assert imports_of(MODULES["tnflow.tasks.backbones"]) == set()
    assert "tensorflow" not in MODULES["tnflow.tasks.backbones"].read_text()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_modules_say_why(name):
    source = MODULES[name].read_text()
    if source.count("\n") > 300:
        docstring = " ".join((ast.get_docstring(ast.parse(source)) or "").split())
        assert "Longer than 300 lines because" in docstring, f"{name}: say why in its docstring, or split it"
