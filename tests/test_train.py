"""Training on the HDF5 cache: learning, resumption after SIGKILL, learning rate 0, exact validation."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import tasks.train as train_module
from tasks.cache import build_cache
from tasks.config import CacheSpec
from tasks.model import PREPROCESSING, ModelSpec
from tasks.train import TrainSettings, train
from tasks.validate import Tally, validate
from tests.fake_weights import read_fake_weights, write_fake_weights
from tests.fakes import make_archive

REPO = Path(__file__).resolve().parents[1]
GAP32 = ModelSpec("vgg19", "gap", 10, 32)
SETTINGS = TrainSettings(epochs=3, batch_size=32, eval_batch_size=64, learning_rate=1e-4, seed=0)
TIMING = ("seconds", "images_per_second")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """400 learnable training images (300 train + 100 valid) and 100 test images at 32 px."""
    root = tmp_path_factory.mktemp("data")
    _, md5 = make_archive(root / "c10.tar.gz", n_train=400, n_test=100)
    return build_cache(root / "c10.tar.gz", md5, CacheSpec("cifar10", 32, 100, None, None, 0), root / "cache")


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory):
    """An uninterrupted three-epoch run from random weights."""
    work = tmp_path_factory.mktemp("reference")
    return train(tiny_cache.path, None, GAP32, SETTINGS, work, class_names=tiny_cache.class_names)


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def test_training_learns(reference):
    history = reference.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["valid_accuracy"] > 0.5, "chance is 0.1"
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert reference.best_epoch == max(history, key=lambda r: r["valid_accuracy"])["epoch"]


def test_model_dir_says_how_to_rebuild_it(reference, tiny_cache):
    meta = json.loads((Path(reference.model_dir) / "model.json").read_text())
    assert (meta["model"], meta["head"], meta["image_size"], meta["num_classes"]) == ("vgg19", "gap", 32, 10)
    assert meta["class_names"] == list(tiny_cache.class_names) and meta["preprocessing"] == PREPROCESSING
    assert meta["epoch"] == reference.best_epoch
    assert meta["metrics"]["valid_accuracy"] == reference.valid_accuracy
    names = {name for name, _ in tf.train.list_variables(str(Path(reference.model_dir) / "model.ckpt"))}
    assert "vgg19/conv1/1/conv/weights" in names and "head/logits/weights" in names
    assert not any("Adam" in name for name in names), "the model directory holds the model, not optimizer state"


def test_a_finished_training_returns_at_once(reference, tiny_cache, monkeypatch, caplog):
    monkeypatch.setattr("tasks.model.build", lambda *a, **k: pytest.fail("a finished training was rebuilt"))
    with caplog.at_level(logging.INFO, logger="tnflow.train"):
        again = train(tiny_cache.path, None, GAP32, SETTINGS, reference.work_dir, class_names=tiny_cache.class_names)
    assert again == reference and "training already finished" in caplog.text


def test_a_killed_run_resumes_at_the_next_epoch(reference, tiny_cache, tmp_path, caplog):
    work = tmp_path / "work"
    child = (
        "import os, signal, sys\n"
        "from tasks.model import ModelSpec\n"
        "from tasks.train import TrainSettings, train\n"
        "kill = lambda epoch: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train(sys.argv[1], None, ModelSpec('vgg19', 'gap', 10, 32), {SETTINGS!r}, sys.argv[2],"
        f" class_names={list(tiny_cache.class_names)!r}, on_epoch_end=kill)\n"
    )
    done = subprocess.run([sys.executable, "-c", child, tiny_cache.path, str(work)], cwd=REPO, capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    state = json.loads((work / "state.json").read_text())
    assert state["epochs_done"] == 1 and not state.get("finished")

    with caplog.at_level(logging.INFO, logger="tnflow.train"):
        resumed = train(tiny_cache.path, None, GAP32, SETTINGS, work, class_names=tiny_cache.class_names)
    assert "resuming at epoch 2 of 3" in caplog.text
    assert "epoch 1/3" not in caplog.text, "epoch 1 must not be trained again"
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == state["history"][0]
    # Same seeded shuffle order and restored optimizer state: the very numbers of an uninterrupted run.
    assert without_timing(resumed.history) == without_timing(reference.history)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["epoch-3"]


@pytest.mark.parametrize("head, size", [("gap", 32), ("full", 224)], ids=["gap-32", "full-224"])
def test_learning_rate_zero_leaves_pretrained_weights_bit_identical(tmp_path, head, size):
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=40, n_test=10)
    spec_cache = CacheSpec("cifar10", size, 10, 8 if size == 224 else None, 4 if size == 224 else None, 0)
    cache = build_cache(tmp_path / "c10.tar.gz", md5, spec_cache, tmp_path / "cache")
    write_fake_weights(tmp_path / "w.h5")
    settings = TrainSettings(epochs=1, batch_size=4, eval_batch_size=8, learning_rate=0.0)
    spec = ModelSpec("vgg19", head, 10, size)
    trained = train(
        cache.path, str(tmp_path / "w.h5"), spec, settings, tmp_path / "work", class_names=cache.class_names
    )
    reader = tf.train.load_checkpoint(str(Path(trained.model_dir) / "model.ckpt"))
    names = sorted(name for name, _ in tf.train.list_variables(str(Path(trained.model_dir) / "model.ckpt")))
    pretrained = [n for n in names if n.startswith("vgg19/") and "logits" not in n]
    assert len(pretrained) == (32 if head == "gap" else 36)
    expected = read_fake_weights(tmp_path / "w.h5")
    order = _tensornets_order(pretrained)
    for name, value in zip(order, expected, strict=False):
        assert np.array_equal(reader.get_tensor(name), value), name


def _tensornets_order(names):
    """conv1/1 ... conv5/4, fc6, fc7: weights before biases, as in the Keras file."""

    def key(name):
        parts = name.split("/")
        layer = parts[1]
        block = (int(layer[4]), int(parts[2])) if layer.startswith("conv") else (int(layer[2:]) + 10, 0)
        return block, parts[-1] != "weights"

    return sorted(names, key=key)


# -- exact validation -------------------------------------------------------------------


def test_accuracy_counts_images_not_batches():
    tally = Tally(num_classes=2)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    right = np.eye(2)[labels]
    wrong = np.eye(2)[1 - labels]
    batches = [(right[:4], labels[:4]), (np.vstack([right[4:6], wrong[6:8]]), labels[4:8]), (wrong[8:], labels[8:])]
    for probs, y in batches:
        tally.add(probs, y, np.ones(len(y)))
    mean_of_batch_means = np.mean([1.0, 0.5, 0.0])
    metrics = tally.metrics("test")
    assert metrics["test_accuracy"] == 0.6 != mean_of_batch_means
    assert metrics["num_test"] == 10 and metrics["confusion_matrix"] == [[4, 1], [3, 2]]
    assert metrics["per_class_accuracy"] == [0.8, 0.4]


def test_validation_is_exact_whatever_the_batch_size(reference, tiny_cache, tmp_path):
    by_7 = validate(reference.model_dir, tiny_cache.path, "test", 7, tmp_path / "a")
    by_64 = validate(reference.model_dir, tiny_cache.path, "test", 64, tmp_path / "b")
    assert by_7["num_test"] == 100 and 100 % 7 and 100 % 64
    assert by_7["test_accuracy"] == by_64["test_accuracy"]
    assert by_7["confusion_matrix"] == by_64["confusion_matrix"]
    assert by_7["test_accuracy"] == sum(np.diag(by_7["confusion_matrix"])) / 100
    assert abs(by_7["test_loss"] - by_64["test_loss"]) < 1e-6
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "per_class_accuracy", "confusion_matrix", "num_test"):
        assert saved[key] == by_7[key]
    assert len(saved["samples"]) == 8 and len(saved["samples"][0]["top"]) == 3


def test_not_a_model_dir(tmp_path, tiny_cache):
    with pytest.raises(train_module.TnflowError, match="is not a tnflow model directory"):
        validate(tmp_path, tiny_cache.path, "test", 8, tmp_path)


def test_a_finished_training_is_a_prefect_cache_hit(prefect_api, reference, tiny_cache):
    from prefect import flow

    from tasks.train import train_stage
    from tests.prefect_runs import task_states

    @flow
    def training_only():
        return train_stage(tiny_cache.path, None, GAP32, SETTINGS, reference.work_dir, list(tiny_cache.class_names))

    first, second = training_only(return_state=True), training_only(return_state=True)
    assert first.result() == second.result() == reference
    assert task_states(first) == {"train": "Completed"} and task_states(second) == {"train": "Cached"}
