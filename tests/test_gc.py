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
    (runs / "champions" / "folder-x" / "run-b" / "champion.json").write_text(json.dumps({"cache": versions[1]}))
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
