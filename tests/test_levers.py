"""Each accuracy lever's effect, on tiny inputs: augmentation, schedule, smoothing, decay, TTA."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.tf.graph import build
from tnflow.tasks.tf.levers import augment, schedule
from tnflow.tasks.tf.sessions import open_session

tf1 = tf.compat.v1
GAP32 = ModelSpec("vgg19", "gap", 4, 32)


def _run(fn):
    with tf.Graph().as_default(), tf1.Session() as session:
        return session.run(fn())


def test_augmentation_is_a_function_of_the_step():
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)

    def at(kind, step):
        return _run(lambda: augment(tf.constant(images), kind, tf.constant([0, step], tf.int64)))

    assert np.array_equal(at("flip-crop", 3), at("flip-crop", 3)), "a resumed step replays the same batch"
    assert not np.array_equal(at("flip-crop", 3), at("flip-crop", 4))
    assert np.array_equal(at("none", 3), images)
    flipped = at("flip", 3)
    for out, image in zip(flipped, images, strict=True):
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
    assert any(not np.array_equal(o, i) for o, i in zip(flipped, images, strict=True))
    # flip-crop: each image is a 16x16 window of its (maybe mirrored) copy reflect-padded by 2
    for out, image in zip(at("flip-crop", 5), images, strict=True):
        windows = [
            padded[r : r + 16, c : c + 16]
            for source in (image, image[:, ::-1])
            for padded in [np.pad(source, ((2, 2), (2, 2), (0, 0)), mode="reflect")]
            for r in range(5)
            for c in range(5)
        ]
        assert any(np.array_equal(out, w) for w in windows)


def test_schedules_warm_up_then_decay_to_zero():
    def rates(**levers):
        settings = TrainSettings(epochs=4, learning_rate=0.1, **levers)
        return _run(lambda: [schedule(settings, tf.constant(s, tf.int64), 10) for s in (0, 9, 10, 25, 39)])

    np.testing.assert_allclose(rates(), [0.1] * 5)
    np.testing.assert_allclose(rates(warmup_epochs=1), [0.01, 0.1, 0.1, 0.1, 0.1], rtol=1e-6)
    cosine = rates(lr_schedule="cosine", warmup_epochs=1)
    np.testing.assert_allclose(cosine[:3], [0.01, 0.1, 0.1], rtol=1e-6)
    assert cosine[3] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 15 / 30)), rel=1e-5)
    assert 0 < cosine[4] < 1e-3, "the last step's rate is nearly zero"


def _one_step(settings, images, labels, fetch="train_op"):
    net = build(GAP32, settings=settings, steps_per_epoch=1)
    with open_session(net) as session:
        session.run(net.init)
        before = session.run(net.head + net.pretrained)
        loss, logits = session.run([net.steps.train_loss, net.logits], {net.images: images, net.labels: labels})
        session.run(getattr(net.steps, fetch), {net.images: images, net.labels: labels, net.is_training: True})
        return before, session.run(net.head + net.pretrained), loss, logits


IMAGES = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
LABELS = np.array([0, 1, 2, 3])


def test_label_smoothing_mixes_the_targets():
    _, _, loss, logits = _one_step(TrainSettings(label_smoothing=0.2), IMAGES, LABELS)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = np.mean(-(0.8 * logp[np.arange(4), LABELS] + 0.2 * logp.mean(axis=1)))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_weight_decay_is_decoupled_from_the_gradient():
    sgd = TrainSettings(optimizer="sgd", momentum=0.0, learning_rate=0.1, seed=3)
    before, plain, _, _ = _one_step(sgd, IMAGES, LABELS)
    _, decayed, _, _ = _one_step(dataclasses.replace(sgd, weight_decay=0.5), IMAGES, LABELS)
    for start, a, b in zip(before, plain, decayed, strict=True):
        if start.ndim > 1:  # the weights shrink by lr x decay x their value, whatever the gradient
            np.testing.assert_allclose(a - b, 0.1 * 0.5 * start, rtol=1e-4, atol=1e-6)
        else:  # biases are not decayed
            np.testing.assert_array_equal(a, b)


def test_tta_flip_averages_an_image_and_its_mirror(tmp_path):
    plain, tta = build(GAP32), build(dataclasses.replace(GAP32, tta="flip"))
    symmetric = np.concatenate([IMAGES[:, :, :16], IMAGES[:, :, :16][:, :, ::-1]], axis=2)
    with open_session(plain) as session:
        session.run(plain.init)
        plain.model_saver.save(session, str(tmp_path / "model.ckpt"), write_meta_graph=False)
        p = session.run(plain.probs, {plain.images: IMAGES})
        p_mirror = session.run(plain.probs, {plain.images: IMAGES[:, :, ::-1]})
        p_symmetric = session.run(plain.probs, {plain.images: symmetric})
    with open_session(tta) as session:
        tta.model_saver.restore(session, str(tmp_path / "model.ckpt"))
        got, got_symmetric = (
            session.run(tta.probs, {tta.images: IMAGES}),
            session.run(tta.probs, {tta.images: symmetric}),
        )
    np.testing.assert_allclose(got, (p + p_mirror) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_symmetric, p_symmetric, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, p, atol=1e-4), "a lopsided image's prediction changes"


def test_the_strong_preset_fills_only_what_is_not_given():
    strong = RunConfig.from_values({"preset": "strong", "augment": "flip", "epochs": 3})
    assert (strong.augment, strong.label_smoothing, strong.lr_schedule, strong.tta) == ("flip", 0.1, "cosine", "flip")
    recipe = RunConfig.from_values({})
    assert (recipe.augment, recipe.label_smoothing, recipe.lr_schedule, recipe.freeze_epochs) == (
        "none",
        0,
        "constant",
        0,
    )
    assert recipe.train_settings().learning_rate == 1e-5 and recipe.model_spec(10).tta == "none"
