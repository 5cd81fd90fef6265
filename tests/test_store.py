"""The store: the layout earlier releases wrote is the layout read now, and their records still load."""

from __future__ import annotations

import json

import pytest

from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.store import layout
from tnflow.tasks.store.records import (
    ChampionRecord,
    append_history_row,
    read_champion_file,
    read_history_rows,
    write_champion_file,
)
from tnflow.tasks.tf.model_files import read_model_dir, update_model_json

# champion.json as the release before typed records wrote it (promote.py, 2026-12-01): no schema version.
WRITTEN_BEFORE = {
    "run_id": "lively-otter",
    "dataset": "folder-1a2b3c4d5e6f",
    "test_accuracy": 0.8125,
    "test_split": "folder:md5:abc:80:0123456789ab",
    "cache": "/cache/folder-photos-32px-0123456789ab.h5",
    "promoted_at": "2026-12-01T10:00:00+00:00",
    "replaced_run_id": None,
    "replaced_accuracy": None,
    "replaced_rescored": False,
    "margin": 0.0,
    "alpha": 0.05,
    "comparison": None,
    "baseline": {"class_name": "cat", "accuracy": 0.5, "p_value": 1e-6},
    "detectable_gain": 0.11,
}


def test_the_layout_is_the_one_earlier_releases_wrote(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    line = layout.champion_line(out, "cifar10-abc")
    assert layout.current_champion(line) == out / "champions" / "cifar10-abc" / "current"
    assert layout.champion_record(layout.champion_dir(line, "r1")) == line / "r1" / "champion.json"
    assert layout.champion_history(line) == line / "history.jsonl"
    assert layout.latest_champion_target("cifar10-abc", "r1").as_posix() == "champions/cifar10-abc/r1"
    work = layout.training_dir(out, "vgg19", "gap", 32, "k")
    assert work == out / "training" / "vgg19-gap-32px-k"
    generation = layout.generation_dir(work, 2)
    assert layout.state_file(generation) == work / "generation-2" / "state.json"
    assert layout.checkpoint_dir(generation, 3) == work / "generation-2" / "checkpoints" / "epoch-3"
    assert layout.epoch_model_dir(generation, 3) == work / "generation-2" / "models" / "epoch-3"
    assert layout.metrics_file(out / "r1") == out / "r1" / "metrics.json"
    assert layout.split_array(out / "r1", "test", "predictions") == out / "r1" / "test_predictions.npy"
    assert layout.dataset_cache_file(cache, "cifar10", 32, "d", "0123456789") == cache / "cifar10-32px-d-01234567.h5"
    assert layout.lineage_pointer(cache, "l") == cache / "folders" / "l.latest"
    assert layout.new_run_dir(out, "r1") == str(out / "r1")
    (out / "r1").mkdir(parents=True)
    assert layout.new_run_dir(out, "r1") == str(out / "r1-2"), "never an existing one"


def test_a_champion_record_written_before_typed_records_loads(tmp_path):
    path = tmp_path / "champion.json"
    path.write_text(json.dumps(WRITTEN_BEFORE, indent=2))
    record = read_champion_file(path)
    assert record is not None and record.schema_version == 1
    assert (record.run_id, record.test_accuracy, record.cache) == ("lively-otter", 0.8125, WRITTEN_BEFORE["cache"])
    assert record.baseline == WRITTEN_BEFORE["baseline"]
    write_champion_file(path, record)
    assert json.loads(path.read_text()) == {**WRITTEN_BEFORE, "schema_version": 1}, "rewritten, nothing lost"


def test_a_field_from_a_newer_release_survives_a_rewrite(tmp_path):
    path = tmp_path / "champion.json"
    path.write_text(json.dumps({**WRITTEN_BEFORE, "schema_version": 2, "added_later": [1, 2]}))
    write_champion_file(path, read_champion_file(path))
    assert json.loads(path.read_text())["added_later"] == [1, 2]


def test_damaged_records_read_as_none_and_torn_history_rows_are_counted(tmp_path):
    path = tmp_path / "champion.json"
    for text in ("{not json", "[1, 2]", json.dumps({"run_id": "x"})):  # damaged, not a record, lacks its accuracy
        path.write_text(text)
        assert read_champion_file(path) is None, text
    assert read_champion_file(tmp_path / "missing.json") is None
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps(WRITTEN_BEFORE) + "\n" + '{"run_id": "torn", "test_acc')  # a crash mid-row
    append_history_row(history, ChampionRecord(run_id="next", test_accuracy=0.9, test_split="s"))
    records, damaged = read_history_rows(history)
    assert [r.run_id for r in records] == ["lively-otter", "next"] and damaged == 1


def test_a_model_json_an_earlier_release_wrote_loads_with_the_records_defaults(tmp_path):
    """As releases before calibration, folders and test-time augmentation wrote it: their fields take defaults."""
    model = tmp_path / "model"
    model.mkdir()
    old = {"format": "tnflow-model/1", "model": "vgg19", "head": "gap", "num_classes": 2, "image_size": 32,
           "class_names": ["cat", "dog"], "checkpoint": "model.ckpt", "weights": "none", "init_from": None}  # fmt: skip
    (model / "model.json").write_text(json.dumps(old))
    (model / "model.ckpt.index").write_bytes(b"index")
    meta = read_model_dir(model)
    assert (meta.temperature, meta.resize, meta.tta, meta.card, meta.calibration) == (1.0, "crop", "none", {}, None)
    assert meta.model_extra == {"weights": "none", "init_from": None}, "what this release does not know is kept"
    update_model_json(model, {"card": {"test": {"images": 4}}})
    assert json.loads((model / "model.json").read_text()) == {**old, "card": {"test": {"images": 4}}}, "as it was"
    (model / "model.json").write_text(json.dumps({**old, "num_classes": "two"}))
    with pytest.raises(TnflowError, match=r"model\.json: num_classes: .*; the model directory is damaged"):
        read_model_dir(model)


def test_a_state_json_an_earlier_release_wrote_resumes_as_it_said(tmp_path):
    """state.json as the release before typed records wrote it: a dict with no schema version."""
    from tnflow.tasks.training.workdir import read_state, write_state

    record = {"epoch": 2, "train_loss": 1.1, "valid_accuracy": 0.5, "temperature": 1.3}
    old = {"device": "/cpu:0", "history": [{**record, "epoch": 1}, record], "best_epoch": 2,
           "best_valid_accuracy": 0.5, "epochs_done": 2}  # fmt: skip
    layout.state_file(tmp_path).write_text(json.dumps(old))
    state = read_state(tmp_path)
    assert (state.epochs_done, state.best_epoch, state.best_valid_accuracy, state.finished) == (2, 2, 0.5, False)
    assert state.history[1] == record and state.device == "/cpu:0"
    state.finished = True
    write_state(tmp_path, state)
    assert json.loads(layout.state_file(tmp_path).read_text()) == {
        **old, "finished": True, "schema_version": 1, "stopped_early": None
    }  # fmt: skip
    layout.state_file(tmp_path).write_text(json.dumps({**old, "epochs_done": "two"}))
    assert read_state(tmp_path).epochs_done == 0, "not a state: rebuilt from the files it names (none here)"
