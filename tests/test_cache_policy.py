"""StageCache, the policy itself: a toy stage whose output file is deleted, damaged, or moved."""

import dataclasses
from pathlib import Path

import pytest
from prefect import flow, task

from tests.prefect_runs import task_states
from tnflow.tasks.core.cache_policy import StageCache, code_version

pytestmark = pytest.mark.slow

CALLS: list[str] = []
SIDE_INPUT = {"value": "a"}


def made(path: str) -> bool:
    return Path(path).is_file() and Path(path).read_text() == "made"


def policy(code: str = "v1") -> StageCache:
    return StageCache(code=code, ignore=("batch",), identity=lambda inputs: SIDE_INPUT["value"], sound=made)


@task(name="make", cache_policy=policy(), persist_result=True)
def make(path: str, batch: int) -> str:
    CALLS.append(path)
    Path(path).write_text("made")
    return path


@task(name="make-somewhere", cache_policy=policy(), persist_result=True)
def make_somewhere(path: str, batch: int) -> str:
    """A stage whose rebuild lands under another name than its first build."""
    CALLS.append(path)
    target = f"{path}.{len(CALLS)}"
    Path(target).write_text("made")
    return target


@flow
def stage(path: str, batch: int = 1, which: str = "make", code: str = "v1") -> str:
    chosen = make if which == "make" else make_somewhere
    if code != "v1":
        chosen = chosen.with_options(cache_policy=policy(code))
    return chosen(path, batch)


def state(path, **options) -> str:
    return next(iter(task_states(stage(str(path), **options, return_state=True)).values()))


def test_reused_while_the_output_is_sound(prefect_api, tmp_path):
    out = tmp_path / "out.txt"
    assert state(out) == "Completed"
    assert state(out) == "Cached"
    assert state(out, batch=64) == "Cached", "an ignored input does not change the key"
    assert CALLS.count(str(out)) == 1


@pytest.mark.parametrize("harm", ["delete", "damage"])
def test_a_deleted_or_damaged_output_is_a_miss_then_reused_again(prefect_api, tmp_path, harm):
    out = tmp_path / f"{harm}.txt"
    state(out)
    out.unlink() if harm == "delete" else out.write_text("truncated")
    assert state(out) == "Completed" and made(str(out))
    assert state(out) == "Cached"


def test_a_rebuild_under_another_name_is_found_by_the_next_run(prefect_api, tmp_path):
    out = tmp_path / "moving.txt"
    assert state(out, which="somewhere") == "Completed"
    Path(f"{out}.{len(CALLS)}").unlink()
    assert state(out, which="somewhere") == "Completed"
    assert state(out, which="somewhere") == "Cached", "the rebuilt record is found, not rebuilt forever"


def test_code_and_identity_are_part_of_the_key(prefect_api, tmp_path):
    out = tmp_path / "keyed.txt"
    state(out)
    assert state(out, code="v2") == "Completed", "new code, new key"
    SIDE_INPUT["value"] = "b"
    try:
        assert state(out) == "Completed", "what the inputs point at changed"
        assert state(out) == "Cached"
    finally:
        SIDE_INPUT["value"] = "a"


def test_code_version_reads_sources():
    version = code_version("tnflow.tasks.tf.graph")
    assert len(version) == 16 and version == code_version("tnflow.tasks.tf.graph")
    assert code_version("tnflow.tasks.tf.graph") != code_version("tnflow.tasks.training.train")
    assert code_version(made) != code_version(policy)


def test_short_digest_names_things_as_the_sha256_idiom_it_replaced_did():
    """Cache files, work directories and champion lines keep their names across the change."""
    import hashlib
    import json

    from tnflow.tasks.config.specs import CacheSpec
    from tnflow.tasks.core.digests import short_digest

    spec = CacheSpec("cifar10", 224, 5000, None, None, 0)
    blob = json.dumps({**dataclasses.asdict(spec), "code": "v1"}, sort_keys=True).encode()
    assert spec.digest("v1") == hashlib.sha256(blob).hexdigest()[:12]
    assert short_digest("text") == hashlib.sha256(b"text").hexdigest()[:16]
    assert short_digest(b"\x00\x01", 8) == hashlib.sha256(b"\x00\x01").hexdigest()[:8]
    assert short_digest({"b": 1, "a": [2]}) == short_digest({"a": [2], "b": 1}), "keys sorted"
