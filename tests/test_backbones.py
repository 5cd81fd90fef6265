"""The zoo: every backbone builds, loads its published file's layout exactly, and trains as asked.

Each model is built once at a small size with a training step whose base is frozen (the
`--freeze-epochs` step) and one that trains everything; fake weights in the model's real
file layout come from the graph's own variable shapes.
"""

import re
import sys

import numpy as np
import pytest

from tests.fake_weights import VGG_CONV, fake_arrays, file_layout, layout_graph, write_fake_weights, write_weights
from tnflow.tasks.config.backbones import BACKBONES, MODELS
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.training.epochs import load_weights_file
from tnflow.tasks.training.weights import check_weights, read_weights

# The backbones whose graph and fake file take 5 s or more on a 2-core machine (ResNet-101's 10 s,
# the deepest in the zoo; VGG-16's 8 s of fake weights; DenseNet-121 and Inception v3) run with
# the slow tests, so that `-m "not slow"` stays a quick loop; the others cover the same code.
SLOW_LAYOUTS = ("resnet101", "vgg16", "densenet121", "inception3")
LAYOUTS = [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_LAYOUTS else m for m in MODELS]


@pytest.mark.parametrize("model", LAYOUTS)
def test_each_backbone_loads_its_published_file_layout_exactly(model, tmp_path):
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import open_session
    from tnflow.tasks.tf.tensornets_compat import nets

    backbone = BACKBONES[model]
    shapes, features = file_layout(model)
    assert sum(int(np.prod(s)) for _, s in shapes) + features * 1000 + 1000 == backbone.params, "the table's count"
    # VGG's gap head reads the convolutional arrays only: a 58 MB file instead of 550 MB
    count = VGG_CONV if backbone.full_head else None
    path = tmp_path / f"{model}.{'h5' if backbone.weights_format == 'keras' else 'npz'}"
    write_fake_weights(path, model, count=count)
    # tensornets' own reader sees the same arrays in the same order: the layout is the real one
    parse = nets.utils.parse_keras_weights if backbone.weights_format == "keras" else nets.utils.parse_weights
    ours = [a for _, a in read_weights(path, backbone.weights_format)]
    theirs = list(parse(str(path)))
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    # the graph the layout came from (VGG: the full head's; the gap head's conv base is its start)
    net = layout_graph(model) if not backbone.full_head else build(ModelSpec(model, "gap", 2, 32))
    with open_session(net) as session:
        session.run(net.init)
        assert load_weights_file(session, net, path, model) == len(net.pretrained)
        loaded = session.run(net.pretrained)
        head_values = session.run(net.head)
    assert all(np.array_equal(v, a) for v, a in zip(loaded, ours, strict=False)), "every array, exactly"
    assert head_values[0].shape == (features if not backbone.full_head else 512, 2) and not head_values[1].any()


def _small_bn_graph(mode: str) -> dict[str, object]:
    """Two BN layers as tensornets' networks call them, a second tower reusing them, 3 SGD steps: all it made."""
    import tensorflow as tf

    from tnflow.tasks.tf import tensornets_compat as compat

    tf1 = tf.compat.v1
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with compat.building_graph(v1_control_flow=True), graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 6, 6, 3])
        training = tf1.placeholder_with_default(False, [])
        decay = tf1.placeholder_with_default(0.9, [])
        defaults = {"scale": True, "epsilon": 1e-5, "outputs_collections": "out"}  # as a network's arg_scope sets
        follow = {"trained": (training, decay), "frozen": (False, None)}[mode]
        outputs = []
        for tower in range(2):
            reuse = tf1.variable_scope(tf1.get_variable_scope(), reuse=tower > 0)
            scope = compat.arg_scope([compat.nets.layers.batch_norm], **defaults)
            with reuse, scope, compat.batch_norm_training(*follow), tf1.variable_scope("net"):
                x = compat.nets.layers.batch_norm(images * 2.0, scope="bn")
                x = compat.nets.layers.batch_norm(tf.nn.relu(x), center=False, decay=0.5, scope="bn2")
                outputs.append(x)
            if tower == 0:  # the first tower's statistics are the ones kept, as `graph.build` does
                updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        loss = tf.reduce_mean(tf.square(outputs[0] + outputs[1] - 1.0))
        trainable = tf1.trainable_variables()
        step = tf.group(tf1.train.GradientDescentOptimizer(0.5).minimize(loss), *updates) if trainable else updates
        feed = {images: rng.normal(3.0, 2.0, (5, 6, 6, 3)).astype(np.float32), training: True}
        with tf1.Session(config=tf1.ConfigProto(inter_op_parallelism_threads=1)) as session:
            session.run(tf1.global_variables_initializer())
            for _ in range(3):
                session.run(step, feed)
            session.run(updates, {images: feed[images]})  # not training: the statistics stay as they are
            values = session.run(tf1.global_variables())
            served = session.run(outputs[0], {images: feed[images]})
        return {
            "variables": [(v.op.name, v.shape.as_list(), v.trainable) for v in tf1.global_variables()],
            "model variables": [v.op.name for v in tf1.get_collection(tf1.GraphKeys.MODEL_VARIABLES)],
            "trainable": [v.op.name for v in trainable],
            "updates": len(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)),
            "outputs": [alias for t in tf1.get_collection("out") for alias in t.aliases],
            "values": [v.tobytes() for v in values],
            "served": served.tobytes(),
        }


@pytest.mark.parametrize("mode", ["trained", "frozen"])
def test_the_lean_batch_norm_builds_what_tensornets_keras_layer_builds_bit_for_bit(mode, monkeypatch):
    """Same variables, names, collections and update ops; the same values after training steps and at evaluation."""
    from tnflow.tasks.tf import tensornets_compat as compat

    lean = _small_bn_graph(mode)
    monkeypatch.setattr(compat, "LEAN_BATCH_NORM", False)
    keras = _small_bn_graph(mode)
    assert lean["updates"] == (8 if mode == "trained" else 0), "two statistics of two layers in each of two towers"
    assert len(lean["variables"]) == 7 and lean["outputs"] == ["net/bn", "net/bn2", "net/bn", "net/bn2"]
    assert lean == keras


def test_frozen_base_then_everything_trains_and_bn_keeps_its_statistics(tmp_path):
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import open_session

    frozen_first = TrainSettings(learning_rate=1e-2, freeze_epochs=1)
    net = build(ModelSpec("mobilenet35v2", "gap", 3, 32), settings=frozen_first)
    path = tmp_path / "w.npz"
    write_fake_weights(path, "mobilenet35v2")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    feed = {net.images: images, net.labels: np.array([0, 1, 2, 0]), net.is_training: True}
    with open_session(net) as session:
        session.run(net.init)
        load_weights_file(session, net, path, "mobilenet35v2")
        loaded, head = session.run(net.pretrained), session.run(net.head)
        session.run(net.steps.train_head_op, feed)
        assert all(np.array_equal(a, b) for a, b in zip(session.run(net.pretrained), loaded, strict=True))
        assert not np.array_equal(session.run(net.head)[0], head[0]), "the head trains while the base is frozen"
        session.run(net.steps.train_op, feed)
        after = dict(zip([v.op.name for v in net.pretrained], session.run(net.pretrained), strict=True))
    before = dict(zip(after, loaded, strict=True))
    stats = [n for n in after if "moving_" in n]
    assert stats and all(np.array_equal(after[n], before[n]) for n in stats), "BN keeps its ImageNet statistics"
    unchanged = [n for n in after if n not in stats and np.array_equal(after[n], before[n])]
    assert not unchanged, "every other variable trains after the frozen epochs"


@pytest.mark.slow  # builds and steps a MobileNet training graph: 12 s
def test_batch_norm_can_train_its_statistics():
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import open_session

    net = build(ModelSpec("mobilenet35v2", "gap", 3, 32), settings=TrainSettings(train_bn=True), steps_per_epoch=1)
    stats = [v for v in net.pretrained if "moving_mean" in v.op.name]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with open_session(net) as session:
        session.run(net.init)
        before = session.run(stats)
        session.run(net.steps.train_op, {net.images: images, net.labels: np.arange(4) % 3, net.is_training: True})
        after = session.run(stats)
    assert all(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.slow
def test_a_batch_normalised_backbone_learns_from_random_weights(tmp_path):
    """MobileNet from scratch on the tests' learnable pictures: validation follows training.

    With BN's moving averages alone (before issue 28) every validation answered one class:
    accuracy 0.100 and loss ln 10 each epoch, while training accuracy rose to 0.32. Precise BN
    re-estimates the statistics on training batches before each validation.
    """
    from tests.fakes import make_archive
    from tnflow.tasks.cache.stage import build_cache
    from tnflow.tasks.config.specs import CacheSpec
    from tnflow.tasks.training.train import train

    _, md5 = make_archive(tmp_path / "a.tar.gz", n_train=800, n_test=20)
    cache = build_cache(tmp_path / "a.tar.gz", md5, CacheSpec("cifar10", 32, 200, None, None, 0), tmp_path / "c")
    settings = TrainSettings(epochs=3, batch_size=32, learning_rate=1e-3, train_bn=True)
    trained = train(
        cache.path, None, ModelSpec("mobilenet35v2", "gap", 10, 32), settings, tmp_path / "w",
        class_names=cache.class_names,
    )  # fmt: skip
    valid = [r["valid_accuracy"] for r in trained.history]
    assert max(valid) >= 0.25 and trained.history[-1]["valid_loss"] < np.log(10) - 0.2, trained.history


@pytest.mark.slow  # builds a cache and a training graph: 10 s
def test_precise_bn_makes_the_statistics_the_mean_over_training_batches(tmp_path):
    from tests.fakes import make_archive
    from tnflow.tasks.cache.cache_reader import CacheFeed
    from tnflow.tasks.cache.stage import build_cache
    from tnflow.tasks.config.specs import CacheSpec
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import open_session, precise_bn

    _, md5 = make_archive(tmp_path / "a.tar.gz", n_train=100, n_test=10)
    cache = build_cache(tmp_path / "a.tar.gz", md5, CacheSpec("cifar10", 32, 20, None, None, 0), tmp_path / "c")
    net = build(ModelSpec("mobilenet35v2", "gap", 10, 32), CacheFeed(cache.path), settings=TrainSettings(train_bn=True))
    first = next(v for v in net.pretrained if v.op.name.endswith("moving_mean"))
    with open_session(net) as session:
        session.run(net.init)
        assert precise_bn(session, net, batch_size=40, images=200) == 80, "every training picture once"
        both = session.run(first)
        precise_bn(session, net, batch_size=40, images=40)
        one = session.run(first)
        precise_bn(session, net, batch_size=80, images=80)
        whole = session.run(first)
    np.testing.assert_allclose(both, whole, rtol=1e-4, atol=1e-6)  # the mean of two halves' means
    assert not np.allclose(one, whole, rtol=1e-3), "one batch's statistics are not the whole split's"


@pytest.mark.parametrize("model", MODELS)
def test_preprocessing_is_tensornets_numpy_preprocess_as_graph_ops(model):
    import tensorflow as tf

    from tnflow.tasks.tf.network import preprocess
    from tnflow.tasks.tf.tensornets_compat import nets  # noqa: F401 - registers tensornets.preprocess

    reference = sys.modules["tensornets.preprocess"].__preprocess_dict__[model]
    images = np.random.default_rng(1).integers(0, 256, (2, 7, 7, 3), dtype=np.uint8)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        ours = session.run(preprocess(tf.constant(images), BACKBONES[model].preprocessing))
    np.testing.assert_allclose(ours, reference(images.astype(np.float32)), rtol=1e-6, atol=1e-4)


def test_a_file_that_does_not_fit_names_the_variable(tmp_path):
    arrays = fake_arrays("mobilenet35v2", imagenet_layer=False)
    name, value = arrays[5]
    bad = [*arrays[:5], (name, np.zeros((*value.shape[:-1], value.shape[-1] + 1), np.float32)), *arrays[6:]]
    write_weights(tmp_path / "bad.npz", "npz", bad)
    found = [(n, a.shape) for n, a in read_weights(tmp_path / "bad.npz", "npz")]
    needed = [(n, a.shape) for n, a in arrays]
    with pytest.raises(DataError, match=re.escape(f"needs {list(value.shape)} for {name}")):
        check_weights(found, needed, "bad.npz", "mobilenet35v2")
    with pytest.raises(DataError, match=f"stops after 7 arrays; mobilenet35v2 needs {needed[7][0]}"):
        check_weights(needed[:7], needed, "short.npz", "mobilenet35v2")


def test_an_npz_that_would_run_code_is_refused(tmp_path):
    import os

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    packed = np.empty(1, dtype=object)
    packed[0] = Exploit()
    np.savez(tmp_path / "evil.npz", names=np.array(["a/weights"]), values=packed)
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system"):
        read_weights(tmp_path / "evil.npz", "npz")


def test_tnflow_models_lists_the_zoo(capsys):
    from tnflow.flows.cli.main import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for backbone in BACKBONES.values():
        line = next(line for line in out.splitlines() if line.startswith(backbone.name + " "))
        assert str(backbone.image_size) in line and f"{backbone.top1:.1f}" in line
        assert f"{backbone.params / 1e6:.1f}M" in line
