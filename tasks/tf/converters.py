"""One writer per export format, and the check of each conversion against the SavedModel.

The SavedModel is written from tnflow's own serving graph (`model.build(serving=...)`), so it
computes exactly what `tnflow predict` does. ONNX and TFLite are converted from a frozen copy
of the same graph without the bytes input, and kept only if their probabilities on probe
images match the SavedModel's within `TOLERANCE` (float16 weights: the difference is
recorded, not required). A converter that fails means the format cannot express the
backbone: one line says so. TensorFlow, tf2onnx and ONNX Runtime are imported only here,
when a format is written.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tnflow.tasks.config.checks import EXPORT_FORMATS
from tnflow.tasks.config.specs import ModelSpec
from tnflow.tasks.core.errors import TnflowError, first_line
from tnflow.tasks.tf.model_files import ModelRecord, restore_model
from tnflow.tasks.tf.startup import start_tensorflow

FILES = {
    "savedmodel": "saved_model",
    "onnx": "model.onnx",
    "tflite": "model.tflite",
    "tflite-float16": "model.float16.tflite",
}
TOLERANCE = 1e-4  # largest difference in any probability from the SavedModel's
ONNX_OPSET = 17
_PROBES = 4  # images the conversions are checked on


@dataclass
class Source:
    """A model being exported, with what several formats need built once per export."""

    model_dir: Path
    meta: ModelRecord
    saved: Path  # its SavedModel, the reference every conversion is checked against

    @functools.cached_property
    def frozen(self) -> Any:
        return _frozen_graph(self.model_dir, self.meta)

    @functools.cached_property
    def reference(self) -> np.ndarray:
        """The SavedModel's probabilities on the probe images."""
        return saved_model_probabilities(self.saved)(probe_images(self.meta.image_size))


def _write_saved_model(source: Source, tmp: Path) -> dict[str, Any]:
    start_tensorflow()
    import tensorflow as tf

    from tnflow.tasks.tf.graph import ServingInput, build
    from tnflow.tasks.tf.sessions import open_session

    tf1 = tf.compat.v1
    meta = source.meta
    spec = ModelSpec.from_meta(meta)
    serving = ServingInput(resize=meta.resize, class_names=tuple(meta.class_names))
    net = build(spec, serving=serving, temperature=meta.temperature)
    method = "tensorflow/serving/predict"
    with open_session(net) as session, net.graph.as_default():
        info = tf1.saved_model.utils.build_tensor_info
        outputs = {name: info(tensor) for name, tensor in net.serving.outputs.items()}
        signatures = {
            "serving_default": tf1.saved_model.signature_def_utils.build_signature_def(
                inputs={"images": info(net.images)}, outputs=outputs, method_name=method
            ),
            "serving_bytes": tf1.saved_model.signature_def_utils.build_signature_def(
                inputs={"image_bytes": info(net.serving.encoded)}, outputs=outputs, method_name=method
            ),
        }
        restore_model(net.model_saver, session, source.model_dir)
        builder = tf1.saved_model.Builder(str(tmp))
        builder.add_meta_graph_and_variables(
            session, [tf1.saved_model.tag_constants.SERVING], signature_def_map=signatures, strip_default_attrs=True
        )
        builder.save()
    return {"file": FILES["savedmodel"], "signatures": sorted(signatures)}


@contextmanager
def _environment_kept(name: str) -> Iterator[None]:
    """tf2onnx sets TF_CPP_MIN_LOG_LEVEL for the whole process; every later child would inherit it."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _write_onnx(source: Source, tmp: Path) -> dict[str, Any]:
    with _environment_kept("TF_CPP_MIN_LOG_LEVEL"):
        return _convert_to_onnx(source, tmp)


def _convert_to_onnx(source: Source, tmp: Path) -> dict[str, Any]:
    try:
        import onnxruntime
        import tf2onnx
    except ImportError:
        raise TnflowError("ONNX export needs the onnx extra: pip install 'tnflow[onnx]'") from None
    meta = source.meta
    try:
        tf2onnx.convert.from_graph_def(
            source.frozen,
            input_names=["images:0"],
            output_names=["probabilities:0"],
            tensors_to_rename={"images:0": "images", "probabilities:0": "probabilities"},
            opset=ONNX_OPSET,
            output_path=str(tmp),
        )
    except Exception as exc:  # noqa: BLE001 - any converter failure means: this backbone cannot go to ONNX
        raise TnflowError(f"ONNX cannot express {meta.model}: {first_line(exc)}; leave onnx out of --export") from None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _compare("onnx", lambda images: session.run(None, {name: images})[0], source)


def _write_tflite(source: Source, tmp: Path, float16: bool = False) -> dict[str, Any]:
    start_tensorflow()
    import tensorflow as tf

    meta, graph_def = source.meta, source.frozen
    imported = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    pruned = imported.prune("images:0", "probabilities:0")
    size = meta.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")])
    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": pruned(images)}

    # Through a SavedModel of its own: converting the function directly loses the signature
    # (`get_signature_runner()`, named inputs and outputs) that TFLite users look up.
    module = tf.Module()
    module.graph, module.serve = imported, serving_default
    # No gradients in an inference file (EfficientNet's swish carries a custom one that cannot be saved).
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f"{tmp.name}-") as plain:
        try:
            signatures = {"serving_default": serving_default.get_concrete_function()}
            tf.saved_model.save(module, plain, signatures=signatures, options=options)
            converter = tf.lite.TFLiteConverter.from_saved_model(plain)
            if float16:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            tmp.write_bytes(converter.convert())
        except Exception as exc:  # noqa: BLE001 - any converter failure means: this backbone cannot go to TFLite
            raise TnflowError(
                f"TFLite cannot express {meta.model}: {first_line(exc)}; leave tflite out of --export"
            ) from None
    fmt = "tflite-float16" if float16 else "tflite"
    return _compare(fmt, tflite_runner(tmp), source, exact=not float16)


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities from a .tflite file for a uint8 batch of any size."""
    start_tensorflow()
    import tensorflow as tf

    with warnings.catch_warnings():  # "use ai_edge_litert": a separate package; TF's own still runs the file
        warnings.simplefilter("ignore", UserWarning)
        runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return lambda images: runner(images=images)["probabilities"]


WRITERS: dict[str, Callable[[Source, Path], dict[str, Any]]] = {
    "savedmodel": _write_saved_model,
    "onnx": _write_onnx,
    "tflite": _write_tflite,
    "tflite-float16": functools.partial(_write_tflite, float16=True),
}
assert set(WRITERS) == set(EXPORT_FORMATS)


# -- checks ---------------------------------------------------------------------------------


def _frozen_graph(model_dir: Path, meta: ModelRecord) -> Any:
    """The inference graph from uint8 images to probabilities, weights as constants: what converters take.

    Built without the bytes input: its decoding loop (map_fn, conds) is TensorFlow Serving's
    business, and would only confuse converters that see the whole function library.
    """
    start_tensorflow()
    import tensorflow as tf

    from tnflow.tasks.tf.graph import ServingInput, build
    from tnflow.tasks.tf.sessions import open_session

    temperature = meta.temperature
    net = build(ModelSpec.from_meta(meta), serving=ServingInput(bytes_input=False), temperature=temperature)
    with open_session(net) as session:
        restore_model(net.model_saver, session, model_dir)
        return tf.compat.v1.graph_util.convert_variables_to_constants(
            session, net.graph.as_graph_def(), [net.probs.op.name]
        )


def saved_model_probabilities(saved: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """The SavedModel's `serving_default` probabilities for a uint8 batch."""
    start_tensorflow()
    import tensorflow as tf

    serving = tf.saved_model.load(str(saved)).signatures["serving_default"]
    return lambda images: serving(images=tf.constant(images))["probabilities"].numpy()


def probe_images(size: int, count: int = _PROBES) -> np.ndarray:
    """Fixed uint8 pictures (smooth gradients with noise) to compare runtimes on."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2 + rng.normal(0, 40, (count, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def _compare(fmt: str, run: Callable[[np.ndarray], np.ndarray], source: Source, exact: bool = True) -> dict[str, Any]:
    want = source.reference
    got = np.asarray(run(probe_images(source.meta.image_size)))
    difference = float(np.max(np.abs(want - got)))
    same_top1 = bool(np.array_equal(want.argmax(1), got.argmax(1)))
    if exact and difference > TOLERANCE:
        raise TnflowError(
            f"the {fmt} export of {source.meta.model} differs from the SavedModel by {difference:.2g} "
            f"(over {TOLERANCE:g}); it was not written. Please report this with the model's model.json"
        )
    return {"file": FILES[fmt], "max_difference": difference, "same_top1": same_top1, "probes": len(want)}
