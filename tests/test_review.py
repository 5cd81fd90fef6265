"""The label review: held-out pictures the model confidently calls something else, most confident first."""

from __future__ import annotations

import csv

import numpy as np

from tests.folders import make_split_folder, picture
from tnflow.tasks.cache.folder_cache import build_folder_cache
from tnflow.tasks.config.options import DataConfig
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.release.review import REVIEW_CSV, disputed, review
from tnflow.tasks.training.train import train
from tnflow.tasks.training.validate import validate


def test_only_confident_disagreements_are_listed():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1])
    rows = disputed(probs, labels, split="test", paths=[], class_names=["cat", "dog"])
    assert [(r.index, r.given, r.predicted) for r in rows] == [(1, "cat", "dog"), (3, "dog", "cat")]
    assert [r.confidence for r in rows] == [0.6, 0.55] and rows[0].path == ""


def test_pictures_put_in_the_wrong_class_folder_top_the_list(tmp_path):
    data = tmp_path / "photos"
    make_split_folder(data, {"train": 24, "val": 8})
    wrong = []
    for i in range(3):  # three pictures of class 0 filed under class 1
        path = data / "val" / "class-1" / f"misfiled-{i}.png"
        picture(0, 5000 + i).save(path)
        wrong.append(str(path))
    config = DataConfig.from_values({"data_dir": str(data), "image_size": 32, "valid_size": 0.2})
    cache = build_folder_cache(data, config.cache_spec(), tmp_path / "cache", workers=1)
    spec = ModelSpec("vgg19", "gap", 3, 32)
    settings = TrainSettings(epochs=4, batch_size=16, learning_rate=1e-4, seed=0)
    trained = train(cache.path, None, spec, settings, tmp_path / "work", class_names=cache.class_names)
    run_dir = tmp_path / "run"
    metrics = validate(trained.model_dir, cache.path, "test", 64, run_dir)
    assert metrics["test_accuracy"] > 0.8, "a model that learnt the classes"
    found = review(trained.model_dir, cache.path, run_dir, 64)
    rows = list(csv.DictReader((run_dir / REVIEW_CSV).open()))
    assert found.count == len(rows) >= 3
    assert sorted(row["path"] for row in rows[:3]) == sorted(wrong), rows[:5]
    assert all(row["given_label"] == "class-1" and row["predicted_label"] == "class-0" for row in rows[:3])
    confidences = [float(row["confidence"]) for row in rows]
    assert confidences == sorted(confidences, reverse=True) and confidences[-1] >= 0.5
