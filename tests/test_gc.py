"""`tnflow gc` removes folder cache versions that nothing refers to, and only those."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.folders import make_folder
from tnflow.flows.cli.main import main
from tnflow.tasks.cache.folder_cache import build_folder_cache
from tnflow.tasks.config.options import DataConfig


def build(data, cache):
    spec = DataConfig.from_values({"data_dir": str(data), "image_size": 32}).cache_spec()
    return build_folder_cache(data, spec, cache, workers=1)


def test_gc_keeps_what_runs_champions_and_the_next_build_need(tmp_path, capsys):
    data, cache, runs = tmp_path / "photos", tmp_path / "cache", tmp_path / "runs"
    make_folder(data, classes=2, per_class=6)
    versions = [build(data, cache).path]
    for week in range(1, 4):
        make_folder(data, classes=2, per_class=1, start=10 * week)
        versions.append(build(data, cache).path)
    (runs / "run-a").mkdir(parents=True)
    (runs / "run-a" / "metrics.json").write_text(json.dumps({"cache": versions[0]}))
    (runs / "champions" / "folder-x" / "run-b").mkdir(parents=True)
    record = {"run_id": "run-b", "test_accuracy": 0.9, "test_split": "folder:x:3:abc", "cache": versions[1]}
    (runs / "champions" / "folder-x" / "run-b" / "champion.json").write_text(json.dumps(record))
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text("{not json")

    args = ["gc", "--cache-dir", str(cache), "--output-dir", str(runs)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [versions[2], "would remove 1 cache file(s), " + out[-1].split(", ")[-1]]
    assert all(os.path.exists(v) for v in versions)

    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == versions[2]
    remaining = sorted(p.name for p in cache.glob("*.h5"))
    assert remaining == sorted(Path(v).name for v in (versions[0], versions[1], versions[3]))
    # The latest version survives and still lends its pixels to the next one.
    make_folder(data, classes=2, per_class=1, start=90)
    assert dict(build(data, cache).summary)["decoded"] == 2


def test_gc_with_a_missing_cache_dir_is_one_line(tmp_path, capsys):
    assert main(["gc", "--cache-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a directory")


class StoppedHereError(Exception):
    """Ends the run once gc has run under it (what follows the starting point is not this test's subject)."""


def test_gc_during_a_run_keeps_the_version_the_run_reads(prefect_api, tmp_path, monkeypatch):
    """A newer version arrives while a run reads an older one that nothing names: gc keeps it until the run ends."""
    from prefect import task

    import tnflow.flows.train as train_flow
    from tnflow.tasks.cache.gc import collect

    data, cache, runs = tmp_path / "photos", tmp_path / "cache", tmp_path / "runs"
    make_folder(data, classes=2, per_class=6)
    seen = {}

    @task(name="starting-point")
    def gc_under_the_run(**kwargs):
        seen["read"] = kwargs["cache_path"]
        make_folder(data, classes=2, per_class=1, start=50)  # a newer version: the run's is no longer the latest
        seen["newer"] = build(data, cache).path
        seen["removed"] = [str(path) for path, _ in collect(cache, runs)]
        raise StoppedHereError

    monkeypatch.setattr(train_flow, "starting_point_task", gc_under_the_run)
    state = train_flow.transfer_learning(
        data_dir=str(data), image_size=32, cache_dir=str(cache), output_dir=str(runs), return_state=True
    )
    assert state.is_failed() and seen["newer"] != seen["read"]
    assert seen["removed"] == [] and os.path.exists(seen["read"]), "the version the run reads is kept"
    assert [p.name for p in (runs / "in-use").iterdir()] == [], "the run's registration ends with it"
    assert [str(path) for path, _ in collect(cache, runs)] == [seen["read"]], "then nothing keeps it"


def test_a_killed_runs_registration_keeps_nothing(tmp_path):
    """The kernel drops a dead process's lock: its record is stale, and gc removes it."""
    import subprocess
    import sys

    from tnflow.tasks.store.in_use import caches_in_use

    runs = tmp_path / "runs"
    child = (
        "import sys, time\n"
        "from tnflow.tasks.store.in_use import reading\n"
        "with reading(sys.argv[1], sys.argv[1] + '/run-x', '/caches/folder-a.h5'):\n"
        "    print('registered', flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child, str(runs)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "registered"
        assert caches_in_use(runs) == {"folder-a.h5"}
    finally:
        process.kill()
        process.wait()
    assert len(list((runs / "in-use").iterdir())) == 1, "a SIGKILL leaves the record"
    (runs / "in-use" / "made-by-hand").mkdir()  # not a record: passed over
    assert caches_in_use(runs) == set(), "a record nothing holds keeps nothing"
    assert [p.name for p in (runs / "in-use").iterdir()] == ["made-by-hand"], "and is removed"
