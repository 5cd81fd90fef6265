"""Code versions: a key changes when a stage's result can, never when only a docstring or a comment does."""

import ast

import pytest


def keyed_sources() -> dict[str, str]:
    """Every module and object whose code feeds a stage's key, by name."""
    import tnflow.tasks.cache.folder_cache
    import tnflow.tasks.cache.stage
    import tnflow.tasks.training.train
    import tnflow.tasks.training.weights  # noqa: F401 - importing them declares their keys
    from tnflow.tasks.core.cache_policy import KEYED, source_of

    return {part if isinstance(part, str) else part.__qualname__: source_of(part) for part in KEYED}


def reworded(source: str) -> str:
    """The same code with every docstring rewritten and comments added, above and inside."""
    tree = ast.parse(source)
    segments = [
        ast.get_source_segment(source, node.body[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    ]
    for segment in segments:
        source = source.replace(segment, '"""Reworded, and longer than before: why, not what."""', 1)
    lines = source.splitlines()
    return "# a new comment\n" + "\n".join(f"{line}  # noted" if line.strip().endswith(")") else line for line in lines)


def test_the_keyed_code_is_everything_that_makes_a_stages_result():
    names = set(keyed_sources())
    assert {
        "tnflow.tasks.training.train",
        "tnflow.tasks.tf.graph",
        "tnflow.tasks.sources.cifar",
        "tnflow.tasks.sources.folder",
    } <= names
    assert {"CacheWriter", "check_weights", "resize_batch"} <= names


@pytest.mark.parametrize("name", sorted(keyed_sources()))
def test_a_docstring_or_comment_edit_leaves_the_key_and_an_expression_edit_changes_it(name):
    from tnflow.tasks.core.cache_policy import meaning

    source = keyed_sources()[name]
    edited = reworded(source)
    assert edited != source and meaning(edited) == meaning(source), "docstrings and comments do not feed a key"
    used = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name))
    lines = source.splitlines(keepends=True)
    line = lines[used.lineno - 1]
    lines[used.lineno - 1] = line[: used.end_col_offset] + "_renamed" + line[used.end_col_offset :]
    assert meaning("".join(lines)) != meaning(source), f"renaming {used.id} on line {used.lineno} changes the key"


def test_moving_code_between_tnflow_modules_leaves_the_key_and_importing_another_name_changes_it():
    from tnflow.tasks.core.cache_policy import meaning

    here = "from tnflow.tasks.cache.resize import fit\nimport tnflow.tasks.cifar as cifar\nfit(cifar.x)\n"
    moved = "from tnflow.tasks.sources.resize import fit\nimport tnflow.tasks.sources.cifar as cifar\nfit(cifar.x)\n"
    assert meaning(here) == meaning(moved), "where a name lives inside tnflow is not what it does"
    assert meaning(here) != meaning(here.replace("import fit", "import fit as fit_square")), "another binding"
    assert meaning("from numpy import sum\n") != meaning("from math import sum\n"), "another package's code"


def keyed_files() -> list[str]:
    """The source files whose code feeds a key (an object's file for a function or a class)."""
    import importlib.util
    import inspect

    keyed_sources()
    from tnflow.tasks.core.cache_policy import KEYED

    files = {importlib.util.find_spec(p).origin if isinstance(p, str) else inspect.getsourcefile(p) for p in KEYED}
    return sorted(files)


@pytest.mark.slow
def test_a_cached_rerun_after_rewording_every_keyed_module_is_all_cached(prefect_api, tmp_path):
    """The upgrade of the issue: only docstrings and comments change, and no finished stage runs again."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.fake_weights import VGG_CONV, write_fake_weights
    from tests.fakes import make_archive
    from tests.prefect_runs import task_states
    from tnflow.flows.train import transfer_learning

    _, data_md5 = make_archive(tmp_path / "c10.tar.gz", n_train=120, n_test=40)
    params = {
        "data_url": (tmp_path / "c10.tar.gz").as_uri(),
        "data_md5": data_md5,
        # VGG19 at 32 px: building the graph is most of one epoch on 120 pictures, and VGG19's is
        # built faster than MobileNet's (README.md, "Which model a test trains").
        "model": "vgg19",
        "head": "gap",
        "weights": str(tmp_path / "vgg19.h5"),
        "weights_md5": write_fake_weights(tmp_path / "vgg19.h5", "vgg19", count=VGG_CONV),
        "image_size": 32,
        "valid_size": 20,
        "epochs": 1,
        "export": "none",
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "runs"),
    }
    first = transfer_learning(**params, return_state=True)
    keyed = ("download", "build-cache", "starting-point", "train")
    assert {stage: task_states(first)[stage] for stage in keyed} == dict.fromkeys(keyed, "Completed")

    # The same tnflow with every keyed module's docstrings reworded and comments added.
    repo, copy = Path(__file__).resolve().parents[1], tmp_path / "upgraded" / "tnflow"
    for folder in ("flows", "tasks", "deployments"):
        shutil.copytree(repo / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "__init__.py").write_text("")
    for original in keyed_files():
        target = copy / Path(original).relative_to(repo)
        source = target.read_text()
        target.write_text(reworded(source))
        assert target.read_text() != source
    rerun = (
        "import json, sys\n"
        "from tnflow.flows.train import transfer_learning\n"
        "import tnflow.tasks.training.train as train\n"
        "from tests.prefect_runs import task_states\n"
        "state = transfer_learning(**json.loads(sys.argv[1]), return_state=True)\n"
        "print(json.dumps({'from': train.__file__, 'states': task_states(state)}))\n"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": f"{copy.parent}:{repo}"}
    done = subprocess.run(
        [sys.executable, "-c", rerun, json.dumps(params)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second["from"].startswith(str(copy)), "the rerun used the reworded copy"
    assert {stage: second["states"][stage] for stage in keyed} == dict.fromkeys(keyed, "Cached")
