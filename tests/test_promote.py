"""The champion gate: better promotes, worse or equal keeps, an interrupted promotion changes nothing."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import tasks.promote as promote_module
from tasks.model_dir import read_model_dir, write_model_json
from tasks.promote import promote, read_champion, split_identity


def fake_model(root: Path, name: str) -> Path:
    model = root / name
    model.mkdir(parents=True)
    write_model_json(model, {"model": "vgg19", "head": "gap", "num_classes": 10, "image_size": 32, "tag": name})
    (model / "model.ckpt.index").write_bytes(name.encode())
    (model / "model.ckpt.data-00000-of-00001").write_bytes(name.encode() * 10)
    return model


def fake_cache(path: Path, labels, source_md5="a" * 32) -> str:
    with h5py.File(path, "w") as f:
        f["test/labels"] = np.asarray(labels)
        f.attrs["dataset"], f.attrs["source_md5"] = "cifar10", source_md5
    return split_identity(path)


@pytest.fixture
def split(tmp_path):
    return fake_cache(tmp_path / "cache.h5", [0, 1, 2, 3])


def champion_tag(output: Path) -> str:
    return read_model_dir(output / "champion")["tag"]


def test_first_model_becomes_champion_and_better_ones_replace_it(tmp_path, split):
    out = tmp_path / "runs"
    first = promote(fake_model(tmp_path, "a"), run_id="run-a", test_accuracy=0.80, test_split=split, output_dir=out)
    assert first.promoted and "first champion" in first.reason and champion_tag(out) == "a"

    better = promote(fake_model(tmp_path, "b"), run_id="run-b", test_accuracy=0.85, test_split=split, output_dir=out)
    assert better.promoted and better.champion_accuracy == 0.80 and champion_tag(out) == "b"
    record = read_champion(out)
    assert (record["run_id"], record["test_accuracy"], record["replaced_accuracy"]) == ("run-b", 0.85, 0.80)
    history = [json.loads(line) for line in (out / "champions" / "history.jsonl").read_text().splitlines()]
    assert [h["run_id"] for h in history] == ["run-a", "run-b"]


@pytest.mark.parametrize(
    "accuracy, margin", [(0.80, 0.0), (0.79, 0.0), (0.805, 0.01)], ids=["equal", "worse", "in-margin"]
)
def test_worse_equal_or_within_margin_keeps_the_champion(tmp_path, split, accuracy, margin):
    out = tmp_path / "runs"
    promote(fake_model(tmp_path, "a"), run_id="run-a", test_accuracy=0.80, test_split=split, output_dir=out)
    kept = promote(
        fake_model(tmp_path, "b"),
        run_id="run-b",
        test_accuracy=accuracy,
        test_split=split,
        output_dir=out,
        margin=margin,
    )
    assert not kept.promoted and "kept the champion" in kept.reason and champion_tag(out) == "a"
    assert not (out / "champions" / "run-b").exists()


def test_a_different_test_split_does_not_compare(tmp_path, split):
    out = tmp_path / "runs"
    other = fake_cache(tmp_path / "other.h5", [0, 1, 2])
    promote(fake_model(tmp_path, "a"), run_id="run-a", test_accuracy=0.50, test_split=split, output_dir=out)
    kept = promote(fake_model(tmp_path, "b"), run_id="run-b", test_accuracy=0.99, test_split=other, output_dir=out)
    assert not kept.promoted and "different test split" in kept.reason and champion_tag(out) == "a"


def test_an_interrupted_promotion_leaves_the_old_champion_whole(tmp_path, split, monkeypatch):
    out = tmp_path / "runs"
    promote(fake_model(tmp_path, "a"), run_id="run-a", test_accuracy=0.80, test_split=split, output_dir=out)
    before = {p.name: p.read_bytes() for p in (out / "champion").iterdir()}

    def killed(link, target):
        raise KeyboardInterrupt("process stopped before the switch")

    monkeypatch.setattr(promote_module, "switch_symlink", killed)
    with pytest.raises(KeyboardInterrupt):
        promote(fake_model(tmp_path, "b"), run_id="run-b", test_accuracy=0.90, test_split=split, output_dir=out)
    assert {p.name: p.read_bytes() for p in (out / "champion").iterdir()} == before
    assert champion_tag(out) == "a" and read_champion(out)["run_id"] == "run-a"

    monkeypatch.undo()
    again = promote(fake_model(tmp_path, "c"), run_id="run-c", test_accuracy=0.90, test_split=split, output_dir=out)
    assert again.promoted and champion_tag(out) == "c"
