"""After validation and in batch scoring: the label review, what to label next, and drift.

One model serves most tests here: three learnable colour classes with three pictures of class 0
filed under class 1 in the held-out folder. The cross-fitted review trains models of its own.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.complexity import FACTOR, SLACK, assert_linear, peak_bytes
from tests.folders import make_split_folder, picture
from tnflow.tasks.cache.cache_reader import fold_of
from tnflow.tasks.cache.folder_cache import build_folder_cache
from tnflow.tasks.cache.h5cache import read_labels
from tnflow.tasks.config.options import DataConfig
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.release.drift import PSI_FLAG, psi, reference_of, uncertainty
from tnflow.tasks.release.predict import drift_of, score, write_to_label
from tnflow.tasks.release.review import BLOCK_ROWS, disputed, label_issues, review, screen
from tnflow.tasks.store.layout import review_csv
from tnflow.tasks.tf.model_files import update_model_json
from tnflow.tasks.training.cross_fit import cross_fit
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.train import train
from tnflow.tasks.training.validate import validate


def planted(n: int = 300, classes: int = 3, errors: int = 20, sure: float = 0.45, seed: int = 0):
    """Probabilities of a hesitant model (`sure` on the true class, on average) and labels with planted errors."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % classes
    probs = rng.dirichlet(np.ones(classes), n) * (1 - sure)
    probs[np.arange(n), truth] += sure
    labels = truth.copy()
    wrong = rng.choice(n, errors, replace=False)
    labels[wrong] = (truth[wrong] + 1 + rng.integers(0, classes - 1, errors)) % classes
    return probs, labels, set(wrong.tolist())


def test_confident_learning_puts_planted_errors_first():
    probs, labels, wrong = planted()
    rows, margin = label_issues(probs, labels)
    assert len(rows) >= 10 and len(set(rows.tolist()) & wrong) >= 0.9 * len(rows), "what it flags is planted"
    assert list(margin[rows]) == sorted(margin[rows]), "most clearly mislabelled first"
    found = disputed(probs, labels, split="valid", paths=[], class_names=["cat", "dog", "frog"])
    assert [r.index for r in found] == rows.tolist() and found[0].margin == margin[rows[0]] < 0


def test_the_ranking_follows_the_confident_joint_by_hand():
    """Four classes' thresholds from the model's own confidence; what is above another class's is disputed.

    benchmarks/bench_statistics.py compares the ranking with cleanlab's on the planted sets
    (identical indices in identical order with cleanlab 2.9); cleanlab is not installed here,
    since its pandas makes every TensorFlow import in the suite seconds slower.
    """
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # 0: labelled 0, sure of it
            [0.5, 0.3, 0.1, 0.1],  # 1: labelled 0
            [0.1, 0.6, 0.2, 0.1],  # 2: labelled 1
            [0.4, 0.4, 0.1, 0.1],  # 3: labelled 1
            [0.1, 0.1, 0.7, 0.1],  # 4: labelled 2
            [0.45, 0.1, 0.35, 0.1],  # 5: labelled 2: below every threshold (0.6, 0.5, 0.4, 0.225)
            [0.65, 0.1, 0.15, 0.1],  # 6: labelled 2: above class 0's threshold: disputed
            [0.1, 0.55, 0.3, 0.05],  # 7: labelled 3: above class 1's threshold (0.5): disputed
            [0.2, 0.2, 0.2, 0.4],  # 8: labelled 3
        ]
    )
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3])
    # thresholds: class 0 (0.7 + 0.5) / 2 = 0.6; class 1 0.5; class 2 (0.7 + 0.35 + 0.15) / 3 = 0.4; class 3 0.225
    rows, margin = label_issues(probs, labels)
    assert rows.tolist() == [6, 7], "6 has margin 0.15 - 0.65 = -0.50, 7 has 0.05 - 0.55 = -0.50: stable order"
    assert margin[6] == pytest.approx(-0.5) and margin[7] == pytest.approx(-0.5)
    assert not {1, 3, 5} & set(rows.tolist()), "wrong, but confident of no class: not disputed"


def test_a_model_at_chance_disputes_little_and_the_ranking_is_linear():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    chance = rng.dirichlet(np.ones(5) * 50, 300)  # near-uniform, unrelated to the labels
    rows, _ = label_issues(chance, labels)
    assert len(rows) < 300 and set(rows.tolist()) <= set(range(300))
    rng = np.random.default_rng(3)

    def screening(n: int):
        probs, labels = rng.dirichlet(np.ones(200), n), rng.integers(0, 200, n)  # 200 classes
        return lambda: label_issues(probs, labels)

    assert assert_linear(screening, 4 * BLOCK_ROWS) <= FACTOR * SLACK
    # What it builds besides its answer stays one block's whatever the split's size (a whole-split
    # copy per temporary made ImageNet's 50,000 x 1,000 test split 13.5x slower than a tenth of it).
    assert assert_linear(screening, 4 * BLOCK_ROWS, peak_bytes) < 2


def test_a_split_the_model_is_at_chance_on_lists_nothing_and_says_why():
    """A sure but random model (a trained one at chance) would have confident learning flag most pictures."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 300)
    random = rng.dirichlet(np.ones(5) * 0.3, 300)  # confident, unrelated to the labels
    assert len(label_issues(random, labels)[0]) > 100, "what confident learning alone would list"
    names = ["a", "b", "c", "d", "e"]
    found, why = screen(random, labels, split="test", paths=[], class_names=names)
    assert found == [] and why.startswith("test: 0.") and "is not better than always answering" in why
    probs, planted_labels, wrong = planted()  # a model that knows the classes: reviewed
    found, why = screen(probs, planted_labels, split="valid", paths=[], class_names=names[:3])
    assert why == "" and len({r.index for r in found} & wrong) >= 0.9 * len(found) > 0


@pytest.fixture(scope="module")
def misfiled(tmp_path_factory):
    """The folder (three class-0 pictures filed under class 1 in val/), a trained model, its validated run."""
    root = tmp_path_factory.mktemp("review")
    data = root / "photos"
    make_split_folder(data, {"train": 24, "val": 8})
    wrong = []
    for i in range(3):
        path = data / "val" / "class-1" / f"misfiled-{i}.png"
        picture(0, 5000 + i).save(path)
        wrong.append(str(path))
    config = DataConfig.from_values({"data_dir": str(data), "image_size": 32, "valid_size": 0.2})
    cache = build_folder_cache(data, config.cache_spec(), root / "cache", workers=1)
    settings = TrainSettings(epochs=4, batch_size=16, learning_rate=1e-4, seed=0)
    trained = train(cache.path, None, ModelSpec("vgg19", "gap", 3, 32), settings, root / "work",
                    class_names=cache.class_names)  # fmt: skip
    run_dir = root / "run"
    test = validate(trained.model_dir, cache.path, "test", 64, run_dir)
    # The model as a run publishes it: carrying its test split's reference, which drift compares with.
    model = root / "model"
    shutil.copytree(trained.model_dir, model)
    update_model_json(model, {"reference": reference_of(test.read_probabilities("test"))})
    return {"data": data, "wrong": wrong, "cache": cache, "trained": trained, "run": run_dir, "test": test,
            "model": model}  # fmt: skip


@pytest.mark.slow  # trains the module's model
def test_pictures_put_in_the_wrong_class_folder_top_the_list(misfiled):
    assert misfiled["test"].accuracy > 0.8, "a model that learnt the classes"
    run_dir = misfiled["run"]
    found = review(
        misfiled["trained"].model_dir, misfiled["cache"].path, run_dir, 64, kept=misfiled["test"].probabilities
    )
    rows = list(csv.DictReader(review_csv(run_dir).open()))
    assert found.count == len(rows) >= 3
    assert sorted(row["path"] for row in rows[:3]) == sorted(misfiled["wrong"]), rows[:5]
    assert all(row["given_label"] == "class-1" and row["predicted_label"] == "class-0" for row in rows[:3])
    margins = [float(row["margin"]) for row in rows]
    assert margins == sorted(margins) and margins[0] < 0


@pytest.mark.slow  # two small trainings
def test_cross_fitted_trainings_review_the_training_split_and_are_reused(tmp_path, caplog):
    """--review-train 2: each training picture scored by the fold model that did not learn it."""
    data = tmp_path / "photos"
    make_split_folder(data, {"train": 50, "val": 4, "test": 4})
    wrong = []
    for i in range(3):  # three class-0 pictures filed under class 1
        path = data / "train" / "class-1" / f"misfiled-{i}.png"
        picture(0, 5000 + i).save(path)
        wrong.append(str(path))
    config = DataConfig.from_values({"data_dir": str(data), "image_size": 32})
    cache = build_folder_cache(data, config.cache_spec(), tmp_path / "cache", workers=1)
    labels = read_labels(cache.path, "train")
    start = StartingPoint(None, None, "none", "random", None, "none")
    spec, settings = ModelSpec("vgg19", "gap", 3, 32), TrainSettings(epochs=4, batch_size=16, learning_rate=1e-4)
    run_dir = tmp_path / "run"
    args = dict(output_dir=str(tmp_path / "out"), run_dir=run_dir, class_names=cache.class_names, eval_batch_size=64)
    log = logging.getLogger("test.cross_fit")
    with caplog.at_level(logging.INFO, logger="test.cross_fit"):
        folds = cross_fit(cache.path, start, spec, settings, 2, log=log, **args)
    trained_without = [int(m.split("without ")[1].split()[0]) for m in caplog.messages if m.startswith("fold ")]
    assert sorted(trained_without) == sorted(np.bincount(fold_of(labels, 2)).tolist()), caplog.messages
    assert len(set(folds.model_dirs)) == 2 and np.load(folds.probabilities).shape == (len(labels), 3)
    assert not folds.caveat, "random weights: no model that saw these pictures"

    found = review(folds.model_dirs[0], cache.path, run_dir, 64, folds)
    assert found.splits == ("valid", "test", "train") and found.scope == "held-out and training"
    rows = [r for r in csv.DictReader(review_csv(run_dir).open()) if r["split"] == "train"]
    assert len(rows) >= 2 and {r["path"] for r in rows} <= set(wrong), rows[:5]
    assert all(r["given_label"] == "class-1" and r["predicted_label"] == "class-0" for r in rows)
    # Out of fold, every planted picture is below every correctly filed one (confident learning
    # flags those above its class's mean confidence: half-trained fold models leave one out at times).
    _, margin = label_issues(np.load(folds.probabilities), labels)
    with h5py.File(cache.path) as f:
        paths = [str(data / p.decode()) for p in f["train/paths"][:]]
    assert sorted(paths[i] for i in np.argsort(margin)[:3]) == sorted(wrong)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.cross_fit"):
        again = cross_fit(cache.path, start, spec, settings, 2, log=log, **args)
    assert again.model_dirs == folds.model_dirs
    assert sum("training already finished" in m for m in caplog.messages) == 2, "each fold is reused, not trained"
    np.testing.assert_array_equal(np.load(again.probabilities), np.load(folds.probabilities))


# -- batch scoring: what to label next, and drift ------------------------------------------


def test_uncertainty_and_psi():
    confidence, margin, entropy = uncertainty(np.array([0.7, 0.2, 0.1]))
    assert (confidence, round(margin, 6)) == (0.7, 0.5)
    assert entropy == pytest.approx(-(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)))
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([1.0, 0.0], [0.5, 0.5]) > PSI_FLAG > psi([0.55, 0.45], [0.5, 0.5])


@pytest.mark.slow  # trains the module's model
def test_a_batch_like_the_test_split_is_not_flagged_and_one_class_only_is(misfiled, tmp_path):
    model, data = misfiled["model"], misfiled["data"]
    like_test = tmp_path / "like-test"
    shutil.copytree(data / "val", like_test)
    seen = []
    score(model, [str(like_test)], tmp_path / "a.csv", seen=seen)
    assert not any(row["flagged"] for row in drift_of(model, seen)), drift_of(model, seen)

    one_class = tmp_path / "one-class"
    shutil.copytree(data / "val" / "class-0", one_class / "class-0")
    seen = []
    score(model, [str(one_class)], tmp_path / "b.csv", seen=seen)
    rows = {row["statistic"]: row for row in drift_of(model, seen)}
    assert rows["PSI of predicted classes"]["flagged"] and rows["PSI of predicted classes"]["value"] > PSI_FLAG


@pytest.mark.slow  # trains the module's model
def test_the_csv_has_margin_and_entropy_and_to_label_lists_the_least_confident(misfiled, tmp_path):
    model, data = misfiled["model"], misfiled["data"]
    seen = []
    score(model, [str(data / "val")], tmp_path / "scored.csv", seen=seen)
    rows = list(csv.DictReader((tmp_path / "scored.csv").open()))
    assert {"probability", "margin", "entropy"} <= set(rows[0]) and all(0 <= float(r["margin"]) <= 1 for r in rows)
    listed = list(csv.DictReader(write_to_label(seen, tmp_path / "to_label.csv", 5).open()))
    confidences = sorted(float(r["probability"]) for r in rows)
    assert [float(r["probability"]) for r in listed] == pytest.approx(confidences[:5], abs=1e-6)


def test_a_drifted_batch_emits_an_event(misfiled, tmp_path, prefect_api, monkeypatch):
    import prefect.events
    from prefect import flow

    from tnflow.tasks.release.predict import DRIFT_EVENT, score_folder_task

    model, data = misfiled["model"], misfiled["data"]
    emitted = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: emitted.append(event))

    @flow
    def scoring(folder: str) -> object:
        return score_folder_task(
            model=str(model), folder=folder, output_dir=str(tmp_path), out=str(tmp_path / "s.csv"), batch_size=32
        )

    inbox = tmp_path / "inbox"  # the validation folder, one of its pictures under a name that is not UTF-8
    shutil.copytree(data / "val", inbox)
    shutil.copy(sorted((inbox / "class-0").iterdir())[0], inbox / "class-0" / os.fsdecode(b"\xe9t\xe9.png"))
    calm = scoring(str(inbox))
    assert not calm.drifted and emitted == []
    rows = list(csv.DictReader(Path(calm.csv).read_text(encoding="utf-8").splitlines()))
    assert [r["class"] for r in rows if r["path"].endswith("class-0/\\xe9t\\xe9.png")] == ["class-0"], "scored, escaped"
    result = scoring(str(data / "val" / "class-1"))
    assert result.drifted and [e["event"] for e in emitted] == [DRIFT_EVENT]
    assert emitted[0]["payload"]["folder"].endswith("class-1") and result.to_label.endswith(".to_label.csv")
