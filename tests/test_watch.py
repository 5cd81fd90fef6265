"""Retraining when the data changes: the watcher counts what changed since the champion and announces it once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import prefect.events

from tests.complexity import FACTOR, SLACK, assert_linear, work
from tests.conftest import api_get, api_post
from tests.folders import make_folder, picture
from tnflow.tasks.cache.folder_cache import build_folder_cache
from tnflow.tasks.config.options import DataConfig
from tnflow.tasks.release.watch import CHANGED_EVENT, announce, count_changes, folder_changes

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def champion_of(folder: Path, cache_dir: Path, output_dir: Path) -> None:
    """A champion trained on `folder` as it is now: what matters to the watcher is its record and its cache."""
    config = DataConfig.from_values({"data_dir": str(folder), "image_size": 32, "valid_size": 0.2})
    cache = build_folder_cache(folder, config.cache_spec(), cache_dir, workers=1)
    line = output_dir / "champions" / "folder-x" / "run-1"
    line.mkdir(parents=True)
    record = {"run_id": "run-1", "test_accuracy": 0.9, "test_split": "s", "cache": cache.path, "promoted_at": "t"}
    (line / "champion.json").write_text(json.dumps(record))
    (output_dir / "champions" / "folder-x" / "current").symlink_to("run-1")


def pictures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A folder of n pictures against a model's n: a tenth new, a tenth changed, a tenth removed, some new ones skipped.

    In no particular order (a cache keeps its pictures in hash order), with non-ASCII names.
    """
    rng = np.random.default_rng(seed)
    names = np.array([f"c{i % 7}/été-{i:07d}.jpg".encode() for i in range(n + n // 10)], dtype=np.bytes_)
    digests = np.array([f"{i:064x}".encode() for i in range(len(names))], dtype="S64")
    known = rng.permutation(n)  # the model's: the first n names
    current = rng.permutation(np.arange(n // 10, len(names)))  # the first tenth removed, the last tenth new
    now = digests.copy()
    now[n // 10 : 2 * n // 10] = b"f" * 64  # changed since
    skipped = names[n:][: n // 20]
    return names[current], now[current], names[known], digests[known], skipped


def test_changes_are_counted_as_a_dict_would_with_python_work_independent_of_the_pictures():
    paths, digests, known_paths, known_digests, skipped = pictures(2000, 0)
    known = dict(zip(known_paths.tolist(), known_digests.tolist(), strict=True))
    current = dict(zip(paths.tolist(), digests.tolist(), strict=True))
    expected = (
        sum(1 for p in current if p not in known and p not in set(skipped.tolist())),
        sum(1 for p, d in current.items() if p in known and known[p] != d),
        sum(1 for p in known if p not in current),
    )
    assert count_changes(paths, digests, known_paths, known_digests, skipped) == expected == (100, 200, 200)
    assert count_changes(paths, digests, known_paths[:0], known_digests[:0], skipped[:0]) == (2000, 0, 0)
    assert count_changes(paths[:0], digests[:0], known_paths, known_digests, skipped) == (0, 0, 2000)

    # At a million pictures a dict probed per picture is what scaled 18-21x for 10x the pictures:
    # the comparison's Python work must not grow with the pictures at all (numpy's does).
    def compare(n: int):
        columns = pictures(n, 1)
        return lambda: count_changes(*columns)

    assert work(compare(4000)) <= SLACK * work(compare(1000)), "a Python step per picture"
    assert assert_linear(compare, 1000) <= FACTOR * SLACK


def test_new_changed_and_removed_pictures_are_counted_against_the_champion(tmp_path):
    folder, cache, out = tmp_path / "photos", tmp_path / "cache", tmp_path / "runs"
    make_folder(folder, classes=2, per_class=10)
    before = folder_changes(folder, cache, out)
    assert (before.new, before.known, before.champion) == (20, 0, None), "no champion: everything is new"
    champion_of(folder, cache, out)
    assert folder_changes(folder, cache, out).total == 0
    make_folder(folder, classes=2, per_class=2, start=100)  # 4 new
    picture(1, 9999).save(folder / "class-0" / "img-0000.png")  # 1 changed
    (folder / "class-1" / "img-0001.png").unlink()  # 1 removed
    changes = folder_changes(folder, cache, out)
    assert (changes.new, changes.changed, changes.removed, changes.known) == (4, 1, 1, 20)
    assert changes.champion == "run-1"


def test_copies_the_champions_build_left_out_are_not_new(tmp_path):
    """A second copy of a picture is kept once by the build: the watcher must not count it new at every look."""
    folder, cache, out = tmp_path / "photos", tmp_path / "cache", tmp_path / "runs"
    make_folder(folder, classes=2, per_class=10)
    shutil.copy(folder / "class-0" / "img-0003.png", folder / "class-0" / "copy.png")
    shutil.copy(folder / "class-1" / "img-0004.png", folder / "class-0" / "elsewhere.png")
    champion_of(folder, cache, out)
    changes = folder_changes(folder, cache, out)
    assert (changes.new, changes.changed, changes.removed, changes.known) == (0, 0, 0, 20)
    make_folder(folder, classes=2, per_class=1, start=100)
    assert folder_changes(folder, cache, out).new == 2


def test_a_change_set_is_announced_once_and_only_past_the_threshold(tmp_path, monkeypatch):
    folder, cache, out = tmp_path / "photos", tmp_path / "cache", tmp_path / "runs"
    make_folder(folder, classes=2, per_class=10)
    champion_of(folder, cache, out)
    emitted = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: emitted.append(event))
    make_folder(folder, classes=1, per_class=1, start=100)  # 1 new of 20: 5%, below 10%
    assert not announce(folder_changes(folder, cache, out), 0.10, out).announced and emitted == []
    make_folder(folder, classes=2, per_class=1, start=200)  # 3 new: 15%
    assert announce(folder_changes(folder, cache, out), 0.10, out).announced
    assert [e["event"] for e in emitted] == [CHANGED_EVENT] and emitted[0]["payload"]["new"] == 3
    assert not announce(folder_changes(folder, cache, out), 0.10, out).announced, "the same change set: once"
    assert announce(folder_changes(folder, cache, out), 2, out).announced is False, "a count: 3 >= 2, but announced"
    make_folder(folder, classes=1, per_class=1, start=300)
    assert announce(folder_changes(folder, cache, out), 2, out).announced and len(emitted) == 2


def flow_runs_of(api: str, deployment_id: str) -> list[dict]:
    return api_post(api, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def test_new_pictures_start_a_retrain_through_the_deployments_trigger(prefect_server, tmp_path):
    """A real server with its automation services: watcher -> event -> trigger -> a retrain-on-new-data flow run."""
    api, env = prefect_server["api"], prefect_server["env"]
    pool = f"tnflow-watch-{uuid.uuid4().hex[:6]}"
    folder, cache, out = tmp_path / "photos", tmp_path / "cache", tmp_path / "runs"
    make_folder(folder, classes=2, per_class=6)

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done

    run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
    run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "retrain-on-new-data", "--pool", pool,
        "--prefect-file", "deployments/prefect.yaml")  # fmt: skip
    deployment = api_get(api, "/deployments/name/transfer-learning/retrain-on-new-data")
    before = {r["id"] for r in flow_runs_of(api, deployment["id"])}
    watch = [sys.executable, "-c", "from tnflow.flows.watch import watch_folder; import sys; "
             "print(watch_folder(data_dir=sys.argv[1], cache_dir=sys.argv[2], output_dir=sys.argv[3], min_new=1))",
             str(folder), str(cache), str(out)]  # fmt: skip
    assert run(*watch).stdout.strip().splitlines()[-1] == "True", "12 new pictures, no champion yet"
    deadline = time.monotonic() + 90
    while not (started := [r for r in flow_runs_of(api, deployment["id"]) if r["id"] not in before]):
        assert time.monotonic() < deadline, "the trigger made no flow run"
        time.sleep(1)
    (triggered,) = started
    assert triggered["parameters"]["data_dir"] == str(folder), "the event's folder is the run's --data-dir"
    assert run(*watch).stdout.strip().splitlines()[-1] == "False", "nothing new since: nothing announced"
    time.sleep(5)
    assert len([r for r in flow_runs_of(api, deployment["id"]) if r["id"] not in before]) == 1
