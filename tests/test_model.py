"""tensornets' VGG19 on TensorFlow 2 through the compatibility module: build, load, preprocess."""

import numpy as np
import pytest

from tests.fake_weights import read_fake_weights, write_fake_weights
from tnflow.tasks.errors import DataError
from tnflow.tasks.model import CAFFE_MEAN_BGR, build, load_pretrained, open_session, preprocess, session_config
from tnflow.tasks.settings import ModelSpec
from tnflow.tasks.weights import PRETRAINED

VGG19 = PRETRAINED["vgg19"].layers


@pytest.fixture(scope="session")
def full_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg19-fake.h5"
    write_fake_weights(path)
    return path


def test_tensornets_imports_through_the_compat_module():
    from tnflow.tasks.tensornets_compat import nets

    assert nets.VGG19 is not None
    with pytest.raises(RuntimeError, match="tnflow loads verified weights itself"):
        nets.utils.get_file("vgg19.h5", "https://example.invalid/vgg19.h5")


@pytest.mark.parametrize(
    "head, size", [("gap", 32), pytest.param("full", 224, marks=pytest.mark.slow)], ids=["gap-32", "full-224"]
)
def test_pretrained_values_load_exactly_and_the_head_starts_fresh(head, size, full_weights):
    spec = ModelSpec("vgg19", head, 10, size)
    net = build(spec, learning_rate=1e-5)  # optimizer slots exist: loading must not touch them
    with open_session(net) as session:
        session.run(net.init)
        assert load_pretrained(session, net, str(full_weights), spec) == len(net.pretrained)
        expected = read_fake_weights(full_weights)
        for variable, value in zip(net.pretrained, expected, strict=False):
            assert np.array_equal(session.run(variable), value), variable.op.name
        weights, biases = session.run(net.head)
    assert len(net.pretrained) == (32 if head == "gap" else 36)
    assert weights.shape == (512 if head == "gap" else 4096, 10) and biases.shape == (10,)
    assert np.all(biases == 0) and 0 < np.abs(weights).max() < 1, "a fresh Glorot-initialised layer"
    assert net.pretrained[0].op.name == "vgg19/conv1/1/conv/weights"


def test_wrong_shapes_are_errors_not_random_weights(tmp_path):
    bad = [*VGG19[:4], ("block3_conv1", ((3, 3, 128, 7), (7,))), *VGG19[5:16]]
    write_fake_weights(tmp_path / "bad.h5", bad)
    spec = ModelSpec("vgg19", "gap", 10, 32)
    net = build(spec)
    with open_session(net) as session, pytest.raises(DataError, match="block3_conv1 has shape"):
        session.run(net.init)
        load_pretrained(session, net, str(tmp_path / "bad.h5"), spec)


def test_truncated_file_is_an_error(tmp_path):
    write_fake_weights(tmp_path / "short.h5", VGG19[:12])
    spec = ModelSpec("vgg19", "gap", 10, 32)
    net = build(spec)
    with (
        open_session(net) as session,
        pytest.raises(DataError, match=r"holds 24 weight arrays; vgg19 \(gap head\) needs 32"),
    ):
        session.run(net.init)
        load_pretrained(session, net, str(tmp_path / "short.h5"), spec)


def test_preprocessing_matches_the_reference():
    import tensorflow as tf

    from tnflow.tasks.tensornets_compat import nets

    pixel = np.array([[[[255, 128, 0]]]], dtype=np.uint8)  # RGB
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        got_pixel, got_images = session.run([preprocess(tf.constant(pixel)), preprocess(tf.constant(images))])
    b, g, r = CAFFE_MEAN_BGR
    np.testing.assert_allclose(got_pixel[0, 0, 0], [0 - b, 128 - g, 255 - r], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_images, nets.preprocess("vgg19", images.astype(np.float32)), atol=1e-4)


@pytest.mark.slow
def test_logits_not_probabilities_feed_the_loss():
    spec = ModelSpec("vgg19", "full", 10, 224)
    net = build(spec)
    assert "softmax" not in net.logits.op.name.lower() and "probs" not in net.logits.name
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with open_session(net) as session:
        session.run(net.init)
        logits, probs, losses = session.run(
            [net.logits, net.probs, net.losses], {net.images: images, net.labels: np.array([3, 7])}
        )
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    shifted = logits - logits.max(axis=1, keepdims=True)
    reference = -(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))[[0, 1], [3, 7]]
    np.testing.assert_allclose(losses, reference, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("switches", [{"mixed_precision": True}, {"xla": True}], ids=["mixed-precision", "xla"])
def test_gpu_switches_build_and_step_on_the_cpu(switches):
    spec = ModelSpec("vgg19", "gap", 10, 32)
    net = build(spec, learning_rate=1e-4, mixed_precision=switches.get("mixed_precision", False))
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with open_session(net, xla=switches.get("xla", False)) as session:
        session.run(net.init)
        _, loss = session.run([net.train_op, net.loss], {net.images: images, net.labels: np.arange(4)})
    assert np.isfinite(loss)


def test_mixed_precision_stays_in_the_training_session():
    """Evaluation (and so the champion gate) is float32 whatever trained earlier in the process."""
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorflow.python.training.experimental import mixed_precision_global_state

    net = build(ModelSpec("vgg19", "gap", 10, 32), learning_rate=1e-4, mixed_precision=True)
    with open_session(net, mixed_precision=True) as session:
        session.run(net.init)
    on, off = rewriter_config_pb2.RewriterConfig.ON, rewriter_config_pb2.RewriterConfig.OFF
    assert not mixed_precision_global_state.is_mixed_precision_graph_rewrite_enabled(), "a process-wide switch"
    assert session_config(mixed_precision=True).graph_options.rewrite_options.auto_mixed_precision == on
    evaluation = build(ModelSpec("vgg19", "gap", 10, 32))
    with open_session(evaluation) as session:
        assert session._config.graph_options.rewrite_options.auto_mixed_precision == off


@pytest.mark.slow
def test_tensorflow_start_up_chatter_is_hidden_unless_the_user_sets_a_level():
    import os
    import subprocess
    import sys

    def start(env):
        command = [sys.executable, "-c", "import tnflow.tasks.model"]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet, loud = start(env), start({**env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert loud.returncode == 0 and loud.stderr, "the user's level wins"
