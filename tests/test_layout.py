"""The house rules: rooms whose imports run one way, TensorFlow in one room, modules a newcomer can read."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"flows": "tnflow.flows", "tasks": "tnflow.tasks"}


def dotted(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join([PACKAGES[parts[0]], *parts[1:]])
    return name.removesuffix(".__init__")


MODULES = {dotted(path): path for folder in PACKAGES for path in sorted((REPO / folder).rglob("*.py"))}
# tasks/ rooms, in the order imports may run: a room imports only from rooms before it (and itself).
ROOMS = ("core", "config", "store", "sources", "cache", "tf", "training", "release", "sweeps")
# A flow whose runs are the children of another's: a sweep's trials are transfer-learning runs.
SUBFLOWS = {("tnflow.flows.sweep", "tnflow.flows.train")}
TENSORFLOW = {"tensorflow", "tensornets", "tf_keras", "keras", "tf2onnx", "onnx", "onnxruntime"}


def room_of(name: str) -> str | None:
    """`core`..`release` for a module of tasks/, `flows` or `cli` for the flows and the command line."""
    parts = name.split(".")
    if parts[1] == "tasks":
        return parts[2] if len(parts) > 2 else None
    return "cli" if parts[2:3] == ["cli"] else "flows"


def imports_of(path: Path, *, everything: bool = False) -> set[str]:
    """What `path` imports, at the top or inside functions (lazy imports count).

    tnflow modules by name (`from pkg import module` counts as the module), or with
    `everything` the top-level names of all packages.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        if everything:
            found |= {name.split(".")[0] for name in names}
        else:
            found |= {name for name in names if name in MODULES}
    return found


def against_the_order(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the rooms' order, or into a flow from anything but the command line."""
    wrong = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            source_room, target_room = room_of(importer), room_of(target)
            if target_room == "flows":
                if source_room != "cli" and (importer, target) not in SUBFLOWS:
                    wrong.append(
                        f"{importer} imports the flow module {target} (flows call tasks; only the CLI calls flows)"
                    )
            elif target_room == "cli":
                if source_room != "cli":
                    wrong.append(f"{importer} imports the command line ({target})")
            elif source_room in ROOMS and target_room in ROOMS and ROOMS.index(target_room) > ROOMS.index(source_room):
                wrong.append(f"{importer} ({source_room}) imports {target} ({target_room}), a room after its own")
    return wrong


def graph_of_tnflow() -> dict[str, set[str]]:
    return {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_every_module_lives_in_a_room():
    loose = [name for name in MODULES if name.startswith("tnflow.tasks.") and room_of(name) not in ROOMS]
    assert loose == [], f"modules outside the rooms of tasks/: {loose}"
    assert {room_of(name) for name in MODULES if name.startswith("tnflow.tasks.")} == set(ROOMS)


def test_every_package_is_in_the_wheel():
    """A package missing from pyproject.toml's list imports from the checkout and fails once installed."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {dotted(path.parent) for folder in PACKAGES for path in (REPO / folder).rglob("__init__.py")}
    assert packages - listed == set()


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_says_what_it_holds_and_may_import(room):
    docstring = ast.get_docstring(ast.parse((REPO / "tasks" / room / "__init__.py").read_text())) or ""
    assert "May import:" in docstring, f"tasks/{room}/__init__.py: say what the room holds and what it may import"
    code = [node for node in ast.parse((REPO / "tasks" / room / "__init__.py").read_text()).body[1:]]
    assert code == [], f"tasks/{room}/__init__.py holds code; importing a room should do nothing"


def test_imports_run_one_way_down_the_rooms_and_nothing_imports_a_flow():
    assert against_the_order(graph_of_tnflow()) == []


def test_the_order_check_catches_an_import_against_it():
    graph = {
        "tnflow.tasks.core.files": {"tnflow.tasks.config.options"},  # core may not import config
        "tnflow.tasks.release.report": {"tnflow.tasks.core.files", "tnflow.tasks.tf.graph"},  # fine
        "tnflow.flows.train": {"tnflow.flows.prepare"},  # a flow importing a flow
        "tnflow.flows.cli.main": {"tnflow.flows.train"},  # the command line calls flows: fine
        "tnflow.tasks.cache.stage": {"tnflow.flows.cli.console"},
    }
    assert against_the_order(graph) == [
        "tnflow.flows.train imports the flow module tnflow.flows.prepare (flows call tasks; only the CLI calls flows)",
        "tnflow.tasks.cache.stage imports the command line (tnflow.flows.cli.console)",
        "tnflow.tasks.core.files (core) imports tnflow.tasks.config.options (config), a room after its own",
    ]


def test_only_the_tf_room_imports_tensorflow():
    """Read from the source, lazy imports included."""
    outside = {
        name: sorted(imports_of(path, everything=True) & TENSORFLOW)
        for name, path in MODULES.items()
        if room_of(name) != "tf"
    }
    assert {name: found for name, found in outside.items() if found} == {}, "only tasks/tf/ may import TensorFlow"


# Reads the pretrained weights' Keras HDF5 file, a format of its own that no cache reader knows.
HDF5_ELSEWHERE = {"tnflow.tasks.training.weights"}


def test_only_the_cache_room_opens_hdf5_files():
    """The stages ask `tasks.cache.contents` for what they read from the cache, so only it knows the layout."""
    outside = {
        name: sorted(imports_of(path, everything=True) & {"h5py"})
        for name, path in MODULES.items()
        if room_of(name) != "cache" and name not in HDF5_ELSEWHERE
    }
    assert {name: found for name, found in outside.items() if found} == {}, "only tasks/cache/ may open HDF5"
    assert imports_of(MODULES["tnflow.tasks.cache.contents"], everything=True) >= {"h5py"}, "the check sees h5py"


@pytest.mark.slow
def test_the_rooms_before_tf_and_the_command_line_load_without_tensorflow():
    """Imports each of them in one fresh process, checking after each one (what their imports pull in counts)."""
    light = sorted(name for name in MODULES if room_of(name) in ("core", "config", "sources", "cache", "cli"))
    probe = (
        "import importlib, sys\n"
        f"for name in {light!r}:\n"
        "    importlib.import_module(name)\n"
        "    if {'tensorflow', 'tensornets'} & set(sys.modules):\n"
        "        print(name)\n"
        "        break\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"{done.stdout.strip()} loads TensorFlow"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
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
    graph = graph_of_tnflow()
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_the_circle_finder_finds_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_the_option_table_and_the_zoo_table_are_leaves():
    """The configuration needs the zoo's model names and the error type; neither needs anything that does work."""
    config = {name for name in MODULES if room_of(name) == "config"}
    assert imports_of(MODULES["tnflow.tasks.config.options"]) <= config | {"tnflow.tasks.core.errors"}
    assert imports_of(MODULES["tnflow.tasks.core.digests"]) == set()
    assert imports_of(MODULES["tnflow.tasks.config.specs"]) <= {"tnflow.tasks.core.digests"}
    assert imports_of(MODULES["tnflow.tasks.config.backbones"]) == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_modules_say_why(name):
    source = MODULES[name].read_text()
    if source.count("\n") > 300:
        docstring = " ".join((ast.get_docstring(ast.parse(source)) or "").split())
        assert "Longer than 300 lines because" in docstring, f"{name}: say why in its docstring, or split it"


# -- one owner for the on-disk layout -------------------------------------------------------

# The names in the output and cache directories' layout (`tasks.store.layout`), as a part of a
# path literal would name them; and the variables that hold those directories.
LAYOUT_NAME = re.compile(
    r"^(champions?|current|training|sweeps|watch|folders|unpacked|predictions|figures|checkpoints|models|in-use"
    r"|metrics\.json|report\.(md|html)|label_review\.csv|leaderboard\.json|champion\.json|state\.json"
    r"|history\.jsonl|stat-index\.json)$|^generation-|^epoch-|\.latest$|\.skipped$|^folder-|\.npy$"
)
LAYOUT_ROOTS = {"output_dir", "cache_dir", "run_dir", "sweep_dir", "work_dir", "out_dir"}
STORE = "tnflow.tasks.store.layout"


def names_the_layout(literal: ast.expr) -> bool:
    if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
        text = literal.value
    elif isinstance(literal, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in literal.values)
    else:
        return False
    return any(LAYOUT_NAME.search(part) for part in text.split("/"))


def layout_joins(source: str) -> list[str]:
    """`x / "literal"` joins and `.glob(...)` calls that name the layout, or join onto one of its roots."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            roots = {n.id for n in ast.walk(node.left) if isinstance(n, ast.Name)} & LAYOUT_ROOTS
            if names_the_layout(node.right) or roots:
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "glob":
            roots = {n.id for n in ast.walk(node.func.value) if isinstance(n, ast.Name)} & LAYOUT_ROOTS
            if (node.args and names_the_layout(node.args[0])) or roots:
                found.append(ast.unparse(node))
    return found


def test_only_the_store_joins_paths_under_the_output_and_cache_directories():
    joins = {name: layout_joins(path.read_text()) for name, path in MODULES.items() if name != STORE}
    assert {name: found for name, found in joins.items() if found} == {}


def test_the_layout_check_sees_joins_and_globs():
    assert "Path(output_dir) / 'champions'" in layout_joins('p = Path(output_dir) / "champions" / key')
    assert layout_joins('p = Path(out) / f"{split}_{name}.npy"') == ["Path(out) / f'{split}_{name}.npy'"]
    assert layout_joins("p = Path(cache_dir) / name") == ["Path(cache_dir) / name"]
    assert layout_joins('found = output.glob("*/metrics.json")') == ["output.glob('*/metrics.json')"]
    assert layout_joins('p = Path(model) / "model.ckpt"') == [], "a model directory's own files are its format's"


# -- importing does no work ---------------------------------------------------------------

IMPORT_PROBE = """
import ast, importlib, json, logging, os, sys, warnings
from pathlib import Path

modules, repo = json.loads(sys.argv[1]), Path(sys.argv[2])
# What importing third-party packages does is theirs: import everything tnflow imports first
# (`from x import y` as it is written: some packages set things up when `y` is first reached),
# and scipy.special, which tensornets imports and which sets a warning filter of its own.
third = set()
for path in [*repo.joinpath("flows").rglob("*.py"), *repo.joinpath("tasks").rglob("*.py")]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            third |= {(alias.name, None) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            third |= {(node.module, alias.name) for alias in node.names}
ours = set(sys.stdlib_module_names) | {"tnflow", "tests", "tensornets", "__future__"}
for module, name in sorted(((m, n) for m, n in third if m.split(".")[0] not in ours), key=str):
    getattr(importlib.import_module(module), name or "__name__", None)
importlib.import_module("scipy.special")


def state():
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in sorted(logging.Logger.manager.loggerDict)]
    return {
        "file descriptors": sorted(os.listdir("/proc/self/fd")),
        "os.environ": dict(os.environ),
        "warning filters": list(warnings.filters),
        "log handlers and filters": {l.name: (list(l.handlers), list(l.filters)) for l in loggers},
    }


before = state()
for name in modules:
    importlib.import_module(name)
    after = now = state()
    logs, known = after["log handlers and filters"], before["log handlers and filters"]
    # A logger created on the way is new, not changed (and Prefect gives its new loggers a filter);
    # a tnflow logger born with a handler or a filter is work done on import.
    bare = ([], [])
    after["log handlers and filters"] = {
        k: v for k, v in logs.items() if k in known or (k.startswith("tnflow") and v != bare)
    }
    changed = [what for what in before if before[what] != after[what]]
    if changed:
        print(f"{name}: {', '.join(changed)}")
    before = now  # each module is judged by what it changed itself
"""


def import_probe(modules: list[str], *extra_paths: Path) -> str:
    env = {**__import__("os").environ, "PYTHONPATH": ":".join(map(str, [*extra_paths, REPO]))}
    command = [sys.executable, "-c", IMPORT_PROBE, __import__("json").dumps(modules), str(REPO)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.fixture(scope="module")
def import_report(tmp_path_factory) -> list[str]:
    """One probe (a process importing TensorFlow and Prefect) over every tnflow module, then two planted ones."""
    planted = tmp_path_factory.mktemp("planted")
    (planted / "filters_on_import.py").write_text('import warnings\nwarnings.filterwarnings("ignore")\n')
    (planted / "quiets_a_logger.py").write_text(
        'import logging\nlogging.getLogger("prefect.task_runs").addFilter(logging.Filter("x"))\n'
    )
    report = import_probe([*sorted(MODULES), "filters_on_import", "quiets_a_logger"], planted)
    return report.splitlines()


@pytest.mark.slow
def test_importing_any_module_changes_no_process_wide_state(import_report):
    """File descriptors, the environment, warning filters, log handlers and filters: as they were."""
    assert [line for line in import_report if not line.startswith(("filters_on_import:", "quiets_a_logger:"))] == []


@pytest.mark.slow
def test_the_import_probe_sees_a_module_that_does_work_on_import(import_report):
    assert import_report == ["filters_on_import: warning filters", "quiets_a_logger: log handlers and filters"]


# -- what the documents point at ---------------------------------------------------------

EXAMPLES = {"test_layout.py", "test_code_keys.py"}  # these name stale modules on purpose, as examples
DOCUMENTS = [
    REPO / "README.md",
    REPO / "benchmarks" / "README.md",
    *sorted(
        path
        for folder in ("flows", "tasks", "benchmarks", "tests")
        for path in (REPO / folder).rglob("*.py")
        if path.name not in EXAMPLES
    ),
]


def dangling_references(text: str) -> list[str]:
    """`tasks/x/y.py` paths and `tasks.x.y` module names in `text` that name no module of the repository."""
    import re

    wrong = []
    for path in re.findall(r"(?<![\w/.])((?:tasks|flows)/[\w/]+\.py)\b", text):
        if not (REPO / path).is_file():
            wrong.append(path)
    for dotted in re.findall(r"(?<![\w/])(?:tnflow\.)?((?:tasks|flows)(?:\.\w+)+)", text):
        where, parts = REPO, dotted.split(".")
        for part in parts:
            if (where / part).is_dir():
                where = where / part
                continue
            if not (where / f"{part}.py").is_file() and where in (REPO, REPO / "tasks"):
                wrong.append(dotted)  # a room or a module must follow `tasks.`
            break
    return wrong


def test_the_documents_name_modules_that_exist():
    found = {str(path.relative_to(REPO)): dangling_references(path.read_text()) for path in DOCUMENTS}
    assert {path: refs for path, refs in found.items() if refs} == {}


def test_the_reference_check_sees_a_stale_name():
    assert dangling_references("see `tasks/model.py` and `tasks.settings.RunConfig`") == [
        "tasks/model.py",
        "tasks.settings.RunConfig",
    ]
    assert dangling_references("`tasks/tf/graph.py`, `tasks.cache.cache_reader.CacheFeed`, tnflow.flows.cli.main") == []


def test_the_gpu_extra_pins_the_tensorflow_the_package_pins():
    """`pip install 'tnflow[gpu]'` brings CUDA and cuDNN for exactly the TensorFlow tnflow is tested on."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (base,) = [d for d in project["dependencies"] if re.match(r"tensorflow\b(?!-)", d)]
    assert project["optional-dependencies"]["gpu"] == [base.replace("tensorflow", "tensorflow[and-cuda]", 1)]


# Declared for another package's sake, not imported by a tnflow module: tensornets needs both.
NEEDED_BY_OTHERS = {
    "setuptools": "tensornets imports distutils",
    "tf-keras": "tensornets' batch normalisation",
    "ml-dtypes": "tensorflow imports it; 0.7 took 1.3 s of every such process's start",
}
# Imported by a tnflow module, installed by a declared dependency that pins it: tensorflow 2.21 requires keras 3.
COMES_WITH = {"keras": "tensorflow"}


def _distribution(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_runtime_dependencies_are_what_the_runtime_modules_import():
    """A library only tests or benchmarks use belongs in the dev extra; one a module imports, in the dependencies."""
    import importlib.metadata
    import sys
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_distribution(d) for d in project["dependencies"]}
    extras = {_distribution(d) for name, ds in project["optional-dependencies"].items() if name != "dev" for d in ds}
    owners = importlib.metadata.packages_distributions()
    imported, undeclared = set(), set()
    for path in MODULES.values():
        for name in imports_of(path, everything=True) - set(sys.stdlib_module_names) - {"tnflow", "__future__"}:
            # Several distributions may install one package (mlflow, mlflow-skinny): one declared is enough.
            distributions = {_distribution(d) for d in owners.get(name, [name])}
            imported |= distributions
            if not distributions & (runtime | extras | set(COMES_WITH)):
                undeclared |= distributions
    assert undeclared == set(), "imported by tnflow but not declared"
    assert set(COMES_WITH.values()) <= runtime
    assert runtime - imported - set(NEEDED_BY_OTHERS) == set(), "declared but imported by no tnflow module"
