"""tensornets' VGG19 on TensorFlow 2 through the compatibility module: build, load, preprocess."""

import os
import sys

import numpy as np
import pytest

from tests.fake_weights import VGG_CONV, fake_arrays, write_fake_weights, write_weights
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.tf.graph import build
from tnflow.tasks.tf.sessions import open_session, session_config
from tnflow.tasks.training.epochs import load_weights_file
from tnflow.tasks.training.weights import read_weights


@pytest.fixture(scope="session")
def full_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg19-fake.h5"
    write_fake_weights(path, "vgg19")
    return path


def checked_load(session, net, path):
    return load_weights_file(session, net, path, "vgg19")  # what training does


def test_tensornets_imports_through_the_compat_module():
    from tnflow.tasks.tf.tensornets_compat import nets

    assert nets.VGG19 is not None
    with pytest.raises(RuntimeError, match="tnflow loads verified weights itself"):
        nets.utils.get_file("vgg19.h5", "https://example.invalid/vgg19.h5")
    with pytest.raises(RuntimeError, match="tnflow loads verified weights itself"):
        sys.modules["tensornets.pretrained"].load_vgg19(None)


@pytest.mark.parametrize(
    "head, size", [("gap", 32), pytest.param("full", 224, marks=pytest.mark.slow)], ids=["gap-32", "full-224"]
)
def test_pretrained_values_load_exactly_and_the_head_starts_fresh(head, size, full_weights):
    spec = ModelSpec("vgg19", head, 10, size)
    net = build(spec, settings=TrainSettings())  # optimizer slots exist: loading must not touch them
    with open_session(net) as session:
        session.run(net.init)
        assert checked_load(session, net, full_weights) == len(net.pretrained)
        expected = [a for _, a in read_weights(full_weights, "keras")]
        for variable, got, value in zip(net.pretrained, session.run(net.pretrained), expected, strict=False):
            assert np.array_equal(got, value), variable.op.name
        weights, biases = session.run(net.head)
    assert len(net.pretrained) == (32 if head == "gap" else 36)
    assert weights.shape == (512 if head == "gap" else 4096, 10) and biases.shape == (10,)
    assert np.all(biases == 0) and 0 < np.abs(weights).max() < 1, "a fresh Glorot-initialised layer"
    assert net.pretrained[0].op.name == "vgg19/conv1/1/conv/weights"


def test_wrong_shapes_are_errors_not_random_weights(tmp_path):
    arrays = fake_arrays("vgg19", count=VGG_CONV)
    arrays[8] = (arrays[8][0], np.zeros((3, 3, 128, 7), np.float32))
    write_weights(tmp_path / "bad.h5", "keras", arrays)
    net = build(ModelSpec("vgg19", "gap", 10, 32))
    with open_session(net) as session, pytest.raises(DataError, match=r"array 8 .* needs \[3, 3, 128, 256\]"):
        checked_load(session, net, tmp_path / "bad.h5")


def test_truncated_file_is_an_error(tmp_path):
    write_weights(tmp_path / "short.h5", "keras", fake_arrays("vgg19", count=24))
    net = build(ModelSpec("vgg19", "gap", 10, 32))
    with open_session(net) as session, pytest.raises(DataError, match=r"stops after 24 arrays; vgg19 needs"):
        checked_load(session, net, tmp_path / "short.h5")


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
    settings = TrainSettings(learning_rate=1e-4, mixed_precision=switches.get("mixed_precision", False))
    net = build(spec, settings=settings)
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with open_session(net, xla=switches.get("xla", False)) as session:
        session.run(net.init)
        _, loss = session.run([net.steps.train_op, net.loss], {net.images: images, net.labels: np.arange(4)})
    assert np.isfinite(loss)


def test_mixed_precision_stays_in_the_training_session():
    """Evaluation (and so the champion gate) is float32 whatever trained earlier in the process."""
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorflow.python.training.experimental import mixed_precision_global_state

    net = build(ModelSpec("vgg19", "gap", 10, 32), settings=TrainSettings(learning_rate=1e-4, mixed_precision=True))
    with open_session(net, mixed_precision=True) as session:
        session.run(net.init)
    on, off = rewriter_config_pb2.RewriterConfig.ON, rewriter_config_pb2.RewriterConfig.OFF
    assert not mixed_precision_global_state.is_mixed_precision_graph_rewrite_enabled(), "a process-wide switch"
    assert session_config(mixed_precision=True).graph_options.rewrite_options.auto_mixed_precision == on
    evaluation = build(ModelSpec("vgg19", "gap", 10, 32))
    with open_session(evaluation) as session:
        assert session._config.graph_options.rewrite_options.auto_mixed_precision == off


@pytest.mark.slow
def test_tensorflow_start_up_chatter_is_hidden_unless_the_user_sets_a_level_or_asks_for_debug():
    import os
    import subprocess
    import sys

    def start(env, verbose=False):
        code = (
            "from tnflow.tasks.tf.startup import start_tensorflow\n"
            f"start_tensorflow(verbose={verbose})\n"
            "import tnflow.tasks.tf.graph\n"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    started = [start(env), start({**env, "TF_CPP_MIN_LOG_LEVEL": "0"}), start(env, verbose=True)]  # at once
    for process in started:
        process.stderr_text = process.communicate(timeout=300)[1]
    quiet, loud, debug = (subprocess.CompletedProcess(p.args, p.returncode, "", p.stderr_text) for p in started)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert loud.returncode == 0 and loud.stderr, "the user's level wins"
    assert debug.returncode == 0 and debug.stderr, "--debug never redirects stderr: a fatal native error stays visible"


# -- the GPU path, checked in the graph (this machine has no GPU) -------------------------


class NoFeed:
    """A feed the graph is built around but never reads from."""

    def num_batches(self, split, batch_size):
        return 0

    def batch(self, split, epoch, shuffle, batch_size, index):
        raise AssertionError("not read")


def gpu_training_graph(mixed_precision=False):
    settings = TrainSettings(learning_rate=1e-4, mixed_precision=mixed_precision)
    return build(ModelSpec("vgg19", "gap", 10, 32), NoFeed(), settings=settings, device="/GPU:0")


def test_a_gpu_graph_takes_uint8_batches_to_the_gpu_and_casts_there():
    import tensorflow as tf

    ops = gpu_training_graph().graph.get_operations()
    (get_next,) = [op for op in ops if op.type == "IteratorGetNext"]
    assert "GPU:0" in get_next.device, "prefetched to the device by the pipeline itself"
    assert get_next.outputs[0].dtype == tf.uint8, "a quarter of float32's host-to-device bytes"
    casts = [op for op in ops if op.type == "Cast" and op.inputs[0].dtype == tf.uint8]
    assert casts and all("GPU:0" in op.device and op.outputs[0].dtype == tf.float32 for op in casts)
    reads = [op for op in ops if op.type == "ParallelMapDatasetV2"]
    assert reads and not any("GPU" in op.device for op in reads), "the reading stays on the CPU"


def optimized_types(net, fetch, config) -> dict[str, set[str]]:
    """Op type -> dtypes after Grappler rewrites the graph for `fetch` as on an A100 (a virtual device)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow.core.protobuf.device_properties_pb2 import DeviceProperties, NamedDevice
    from tensorflow.python.grappler import cluster, tf_optimizer

    meta = meta_graph_pb2.MetaGraphDef(graph_def=net.graph.as_graph_def())
    meta.collection_def["train_op"].node_list.value.append(fetch.name.split(":")[0])
    config.graph_options.rewrite_options.min_graph_nodes = -1
    a100 = DeviceProperties(type="GPU", environment={"architecture": "8.0"}, num_cores=108, frequency=1410)
    device = NamedDevice(name="/job:localhost/replica:0/task:0/device:GPU:0", properties=a100)
    graph = tf_optimizer.OptimizeGraph(config, meta, cluster=cluster.Cluster(devices=[device]))
    found: dict[str, set[str]] = {}
    for node in graph.node:
        if "T" in node.attr:
            found.setdefault(node.op, set()).add(tf.dtypes.as_dtype(node.attr["T"].type).name)
    return found


@pytest.mark.slow
def test_mixed_precision_rewrites_the_training_step_only():
    net = gpu_training_graph(mixed_precision=True)
    training = optimized_types(net, net.steps.train_op, session_config(mixed_precision=True))
    convolutions = training.get("Conv2D", set()) | training.get("_FusedConv2D", set())  # fused with their bias
    assert convolutions == {"float16"} and training["Conv2DBackpropFilter"] == {"float16"}
    assert training["ResourceApplyAdam"] == {"float32"}, "the weights and their updates stay float32"
    evaluation = optimized_types(net, net.probs, session_config())
    convolutions = evaluation.get("Conv2D", set()) | evaluation.get("_FusedConv2D", set())
    assert convolutions == {"float32"}, "validation and export sessions stay float32"


def test_xla_compiles_training_sessions_only():
    from tensorflow.core.protobuf import config_pb2

    on = config_pb2.OptimizerOptions.ON_1
    assert session_config(xla=True).graph_options.optimizer_options.global_jit_level == on
    assert session_config().graph_options.optimizer_options.global_jit_level != on


def test_a_graph_on_the_cpu_skips_grapplers_gpu_only_passes(monkeypatch):
    """Layout (NCHW for cuDNN) and memory (swapping to the host) change nothing on the CPU and cost its start."""
    from tensorflow.core.protobuf import rewriter_config_pb2

    import tnflow.tasks.tf.sessions as sessions

    rewrite = rewriter_config_pb2.RewriterConfig
    cpu = session_config(gpu=False).graph_options.rewrite_options
    assert (cpu.layout_optimizer, cpu.memory_optimization) == (rewrite.OFF, rewrite.NO_MEM_OPT)
    gpu = session_config().graph_options.rewrite_options
    assert (gpu.layout_optimizer, gpu.memory_optimization) == (rewrite.DEFAULT, rewrite.DEFAULT_MEM_OPT)
    asked = []
    monkeypatch.setattr(sessions, "session_config", lambda **kw: asked.append(kw["gpu"]) or session_config(**kw))
    for device in ("/CPU:0", "/device:GPU:0"):  # a GPU tower's graph is only built here, never run
        net = build(ModelSpec("vgg19", "gap", 2, 32), device=device)
        sessions.open_session(net).close()
    assert asked == [False, True]


def test_the_log_says_what_runs_where():
    from tnflow.tasks.tf.sessions import describe_devices

    line, warnings = describe_devices([], mixed_precision=False, xla=False)
    assert line.startswith("device: CPU (no GPU visible to TensorFlow)") and not warnings
    a100 = {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}
    line, warnings = describe_devices([a100, a100], mixed_precision=True, xla=True)
    assert "/GPU:0 (NVIDIA A100-SXM4-40GB, compute capability 8.0; 2 GPUs visible, tnflow uses the first)" in line
    assert "uint8 to the GPU, cast there" in line and "float16 compute for training" in line and "XLA" in line
    assert not warnings
    _, warnings = describe_devices(
        [{"device_name": "Tesla P100", "compute_capability": (6, 0)}], mixed_precision=True, xla=False
    )
    assert len(warnings) == 1 and "no fast float16" in warnings[0]


def test_an_nvidia_gpu_that_tensorflow_cannot_see_names_the_gpu_extra(tmp_path):
    from tnflow.tasks.tf.sessions import describe_devices, nvidia_devices

    dev, driver = tmp_path / "dev", tmp_path / "proc" / "driver" / "nvidia" / "gpus"
    dev.mkdir()
    (dev / "nvidiactl").touch()  # the control device is on every driver install, GPU or not
    assert nvidia_devices(dev, driver) == []
    driver.joinpath("0000:3b:00.0").mkdir(parents=True)
    assert nvidia_devices(dev, driver) == [str(driver / "0000:3b:00.0")], "the driver's list, without /dev files"
    (dev / "nvidia0").touch()
    (dev / "nvidia1").touch()
    assert nvidia_devices(dev, driver) == [str(dev / "nvidia0"), str(dev / "nvidia1")]

    line, warnings = describe_devices([], mixed_precision=False, xla=False, nvidia=[str(dev / "nvidia0")])
    assert line.startswith("device: CPU") and len(warnings) == 1
    assert f"NVIDIA GPU ({dev / 'nvidia0'}) but TensorFlow sees none" in warnings[0]
    assert "pip install 'tnflow[gpu]'" in warnings[0]
    a100 = {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}
    assert describe_devices([a100], mixed_precision=False, xla=False, nvidia=[str(dev / "nvidia0")])[1] == []


def test_claiming_a_gpu_makes_it_the_only_one_tensorflow_allocates_on(monkeypatch):
    import tensorflow as tf

    import tnflow.tasks.tf.startup as startup
    from tnflow.tasks.tf.sessions import describe_devices

    startup.start_tensorflow()
    calls = []
    monkeypatch.setattr(startup, "_GPUS", ["GPU-0", "GPU-1"])  # the device list the code sees
    monkeypatch.setattr(startup, "_CLAIMED", [])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: calls.append((devices, kind)))
    startup.claim_gpus(())
    assert calls == [], "no slot, no GPU held: TensorFlow as it is"
    startup.claim_gpus((1,))
    startup.claim_gpus((1,))  # validation after training, in the same process
    assert calls == [(["GPU-1"], "GPU")], "once, and only the run's GPU"

    def initialised(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", initialised)
    with pytest.raises(RuntimeError, match="already computes on GPU 1; run each training in a process of its own"):
        startup.claim_gpus((0, 1))

    a100 = {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}
    line, _ = describe_devices([a100, a100], mixed_precision=False, xla=False, gpus=(1,))
    assert "device: /GPU:1 (NVIDIA A100-SXM4-40GB, compute capability 8.0; GPU 1 of 2 on this machine" in line
    line, _ = describe_devices([a100] * 4, mixed_precision=False, xla=False, gpus=(2, 3), towers=2)
    assert "device: 2 towers, one per GPU (NVIDIA A100-SXM4-40GB, compute capability 8.0; GPUs 2, 3 of 4" in line


def test_without_a_gpu_driver_the_flow_learns_there_is_no_gpu_without_importing_tensorflow(monkeypatch):
    """A re-run whose stages are all kept would otherwise import TensorFlow only to hear "no GPU"."""
    from types import SimpleNamespace

    import tnflow.tasks.tf.startup as startup

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(startup, "_STARTED", [])
    monkeypatch.setattr(startup, "_GPUS", [])
    monkeypatch.setattr(startup, "physical_gpus", lambda: pytest.fail("TensorFlow was asked"))
    monkeypatch.setattr(startup, "_dev_names", lambda: ["null", "nvidiactl", "nvidia-uvm", "tty0"])
    assert startup.visible_gpus() == []
    device = SimpleNamespace(name="/physical_device:GPU:0")
    for devices in (["null", "nvidia0"], ["dxg"]):  # a driver's GPU, or WSL 2's: TensorFlow is asked
        monkeypatch.setattr(startup, "_dev_names", lambda devices=devices: devices)
        monkeypatch.setattr(
            startup.os.path, "exists", lambda path, devices=devices: path == "/dev/dxg" and "dxg" in devices
        )
        monkeypatch.setattr(startup, "physical_gpus", lambda: [device])
        assert startup.visible_gpus() == ["/GPU:0"]


@pytest.mark.slow
def test_tensorflow_starts_without_keras_3_and_leaves_the_environment_as_it_found_it():
    """Keras 3's optimizers cost every tnflow process 1.2 s of CPU at TensorFlow's import; tnflow builds no Keras model.

    In a fresh process (this one imported TensorFlow long ago): after the start-up and the graph
    module, Keras 3 is not imported, and the variable set for the import is gone. (The `tnflow`
    commands the other tests run train in such processes.)
    """
    import subprocess

    code = (
        "import os, sys\n"
        "from tnflow.tasks.tf.startup import start_tensorflow\n"
        "start_tensorflow()\n"
        "import tnflow.tasks.tf.graph\n"
        "print(os.environ.get('TF_USE_LEGACY_KERAS'), 'keras.src' in sys.modules)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "None False", "Keras 3 imported, or the variable left set"


def test_two_towers_are_claimed_together(monkeypatch):
    import tensorflow as tf

    import tnflow.tasks.tf.startup as startup

    startup.start_tensorflow()
    calls = []
    monkeypatch.setattr(startup, "_GPUS", ["GPU-0", "GPU-1", "GPU-2"])
    monkeypatch.setattr(startup, "_CLAIMED", [])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: calls.append((devices, kind)))
    startup.claim_gpus((0, 2))
    assert calls == [(["GPU-0", "GPU-2"], "GPU")]
