"""When a stage's recorded result may be reused: Prefect cache keys that see the stage's output.

Prefect's `INPUTS + TASK_SOURCE` keys a record by the task's arguments and the thin task
function's source. A record holds a path, and Prefect returns it even after the file was
deleted or damaged, and a change to the functions that do the work (which live outside the
task function) invalidates nothing. `StageCache` keys a record by the inputs that change the
result, plus the version of the code that computes it, and uses a record only while the
output it names is still sound; otherwise the run misses, rebuilds, and records the result
under a key derived from the stale one, so the next run finds it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import secrets
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from tnflow.tasks.core.digests import short_digest

MAX_REBUILDS = 32  # stale records walked past before a key gives up on reuse


KEYED: list[str | object] = []  # every module and object whose code feeds a key (for the tests)


def code_version(*parts: str | object) -> str:
    """Digest of what the modules (by dotted name, not imported) or objects given do.

    A key changes when a result can: the digest is of the syntax tree without docstrings
    (comments never reach it), so an upgrade that only rewords them retrains nothing and
    rebuilds no cache. A change to any expression, name or constant changes it.
    """
    KEYED.extend(parts)
    return short_digest("".join(meaning(source_of(part)) for part in parts))


def source_of(part: str | object) -> str:
    if isinstance(part, str):
        spec = importlib.util.find_spec(part)
        if spec is None or spec.origin is None:
            raise ValueError(f"no source for module {part}")
        return Path(spec.origin).read_text()
    return textwrap.dedent(inspect.getsource(part))


def meaning(source: str) -> str:
    """The syntax tree of `source` without docstrings or positions: what the code does, not how it reads.

    Imports from tnflow keep the names they import but not the module they come from: moving
    code between tnflow's modules changes no key (the moved code is keyed where it is used).
    """
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and _docstring(node):
            node.body = node.body[1:] or [ast.Pass()]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tnflow."):
            node.module = "tnflow"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tnflow.") and alias.asname:
                    alias.name = "tnflow"
    return ast.dump(tree, include_attributes=False)


def _docstring(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = node.body[0] if node.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


@dataclass
class StageCache(CachePolicy):
    """Inputs that change the result + code version + a check that the recorded output is still sound.

    `ignore` names inputs that do not change the result (an evaluation batch size);
    `identity(inputs)` adds what the inputs only point at (a local file's size and time, the
    training generation); `sound(result)` says whether a recorded result's output is intact.
    """

    code: str = ""
    ignore: tuple[str, ...] = ()
    identity: Callable[[dict[str, Any]], Any] | None = None
    sound: Callable[[Any], bool] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        material = {name: value for name, value in inputs.items() if name not in self.ignore}
        extra = self.identity(inputs) if self.identity else None
        key = hash_objects(task_ctx.task.name, material, self.code, extra, raise_on_failure=True)
        if self.sound is None:
            return key
        store = task_ctx.result_store
        for _ in range(MAX_REBUILDS):
            if not store.exists(key):
                return key  # nothing recorded: run and record here
            try:
                recorded = store.read(key).result
            except Exception:  # noqa: BLE001 - an unreadable record is a stale one
                recorded = "unreadable"
            else:
                if self.sound(recorded):
                    return key
            # The output this record names is gone or damaged: look where its rebuild was recorded.
            key = hash_objects(key, "rebuilt-after", repr(recorded), raise_on_failure=True)
        return f"{key}-{secrets.token_hex(8)}"
