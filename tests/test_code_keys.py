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
