"""Exports: a model directory as a SavedModel, ONNX and TFLite, each checked before it is kept.

A tnflow model directory needs tnflow and tensornets to run. An export needs only its
runtime, and carries the preprocessing inside, so no serving stack re-implements it:

    saved_model/          TensorFlow Serving's format; signatures `serving_default` (uint8 RGB
                          (N, S, S, 3) -> probabilities, classes, top_class) and `serving_bytes`
                          (encoded JPEG/PNG/GIF/BMP (N,) -> the same, decoded and squared as the
                          cache did: `tasks/decode_graph.py`)
    model.onnx            uint8 RGB -> probabilities (ONNX Runtime); the `onnx` extra
    model.tflite          the same in float32; model.float16.tflite with float16 weights
    labels.txt            the class names, one per line, in the order of the probabilities

ONNX and TFLite are converted from the SavedModel's `serving_default` and kept only if their
probabilities on probe images match it within `TOLERANCE` (float16: the same top-1 is all
that is asked; its difference is recorded). Exports of a trained model are made once and
shared by every run that reaches the same model (`exports_of`): each file is written under a
lock to a temporary name and renamed when checked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.errors import TnflowError
from tnflow.tasks.files import (
    exclusive,
    link_or_copy,
    link_tree,
    new_directory,
    remove_stale_temps,
    temp_path,
    write_atomic,
)
from tnflow.tasks.model_card import card_data, write_card
from tnflow.tasks.model_dir import CHECKPOINT, model_digest, read_model_dir, update_model_json
from tnflow.tasks.progress import STAGE_HOOKS
from tnflow.tasks.report import data_sections
from tnflow.tasks.retries import retry_unless
from tnflow.tasks.settings import EXPORT_FORMATS, ModelSpec

FILES = {
    "savedmodel": "saved_model",
    "onnx": "model.onnx",
    "tflite": "model.tflite",
    "tflite-float16": "model.float16.tflite",
}
LABELS = "labels.txt"
TOLERANCE = 1e-4  # largest difference in any probability from the SavedModel's
ONNX_OPSET = 17
_PROBES = 4  # images the conversions are checked on


def export(model_dir: str | Path, formats: tuple[str, ...], target: str | Path | None = None) -> dict[str, Any]:
    """Write `formats` of the model in `model_dir` into `target` (default: the model directory itself).

    Returns what each check found ({format: {"file", "max_difference", ...}}), which the model
    card records. The SavedModel is made first when another format needs it.
    """
    model_dir = Path(model_dir)
    target = Path(target) if target is not None else model_dir
    meta = read_model_dir(model_dir)
    needed = ("savedmodel", *formats) if formats and "savedmodel" not in formats else formats
    with exclusive(target / ".exports"):  # a second run exporting the same model waits, then finds them
        for fmt in needed:
            final = target / FILES[fmt]
            remove_stale_temps(final)
            if final.exists():
                continue
            tmp = temp_path(final)
            try:
                _record_check(target, fmt, _WRITERS[fmt](model_dir, meta, target / FILES["savedmodel"], tmp))
                tmp.rename(final)
            except BaseException:
                _remove(tmp)
                raise
        write_atomic(target / LABELS, "".join(f"{name}\n" for name in meta["class_names"]))
        return {fmt: _read_check(target, fmt) for fmt in formats}


def exports_of(model_dir: str | Path, formats: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """The shared exports of a trained model: beside it, named by its digest, made at most once."""
    model_dir = Path(model_dir)
    shared = model_dir.with_name(f"{model_dir.name}.exports-{model_digest(model_dir)}")
    shared.mkdir(exist_ok=True)
    return shared, export(model_dir, formats, shared)


# -- one writer per format ------------------------------------------------------------------


def _write_saved_model(model_dir: Path, meta: dict[str, Any], _: Path, tmp: Path) -> dict[str, Any]:
    import tensorflow as tf

    from tnflow.tasks.model import ServingInput, build, open_session

    tf1 = tf.compat.v1
    spec = ModelSpec.from_meta(meta)
    serving = ServingInput(resize=meta.get("resize", "crop"), class_names=tuple(meta["class_names"]))
    net = build(spec, serving=serving)
    method = "tensorflow/serving/predict"
    with open_session(net) as session, net.graph.as_default():
        info = tf1.saved_model.utils.build_tensor_info
        outputs = {name: info(tensor) for name, tensor in net.outputs.items()}
        signatures = {
            "serving_default": tf1.saved_model.signature_def_utils.build_signature_def(
                inputs={"images": info(net.images)}, outputs=outputs, method_name=method
            ),
            "serving_bytes": tf1.saved_model.signature_def_utils.build_signature_def(
                inputs={"image_bytes": info(net.encoded)}, outputs=outputs, method_name=method
            ),
        }
        net.model_saver.restore(session, str(model_dir / CHECKPOINT))
        builder = tf1.saved_model.Builder(str(tmp))
        builder.add_meta_graph_and_variables(
            session, [tf1.saved_model.tag_constants.SERVING], signature_def_map=signatures, strip_default_attrs=True
        )
        builder.save()
    return {"file": FILES["savedmodel"], "signatures": sorted(signatures)}


def _write_onnx(model_dir: Path, meta: dict[str, Any], saved: Path, tmp: Path) -> dict[str, Any]:
    try:
        import onnxruntime
        import tf2onnx
    except ImportError:
        raise TnflowError("ONNX export needs the onnx extra: pip install 'tnflow[onnx]'") from None
    graph_def = _frozen_graph(model_dir, meta)
    try:
        tf2onnx.convert.from_graph_def(
            graph_def,
            input_names=["images:0"],
            output_names=["probabilities:0"],
            tensors_to_rename={"images:0": "images", "probabilities:0": "probabilities"},
            opset=ONNX_OPSET,
            output_path=str(tmp),
        )
    except Exception as exc:  # noqa: BLE001 - any converter failure means: this backbone cannot go to ONNX
        raise TnflowError(
            f"ONNX cannot express {meta['model']}: {_first_line(exc)}; leave onnx out of --export"
        ) from None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _compare("onnx", lambda images: session.run(None, {name: images})[0], saved, meta)


def _write_tflite(model_dir: Path, meta: dict[str, Any], saved: Path, tmp: Path, float16: bool = False) -> dict:
    import tensorflow as tf

    graph_def = _frozen_graph(model_dir, meta)
    imported = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    pruned = imported.prune("images:0", "probabilities:0")
    size = meta["image_size"]

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
                f"TFLite cannot express {meta['model']}: {_first_line(exc)}; leave tflite out of --export"
            ) from None
    fmt = "tflite-float16" if float16 else "tflite"
    return _compare(fmt, tflite_runner(tmp), saved, meta, exact=not float16)


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities from a .tflite file for a uint8 batch of any size."""
    import tensorflow as tf

    with warnings.catch_warnings():  # "use ai_edge_litert": a separate package; TF's own still runs the file
        warnings.simplefilter("ignore", UserWarning)
        runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return lambda images: runner(images=images)["probabilities"]


_WRITERS: dict[str, Callable[[Path, dict[str, Any], Path, Path], dict[str, Any]]] = {
    "savedmodel": _write_saved_model,
    "onnx": _write_onnx,
    "tflite": _write_tflite,
    "tflite-float16": lambda model_dir, meta, saved, tmp: _write_tflite(model_dir, meta, saved, tmp, float16=True),
}
assert set(_WRITERS) == set(EXPORT_FORMATS)


# -- checks ---------------------------------------------------------------------------------


def _frozen_graph(model_dir: Path, meta: dict[str, Any]) -> Any:
    """The inference graph from uint8 images to probabilities, weights as constants: what converters take.

    Built without the bytes input: its decoding loop (map_fn, conds) is TensorFlow Serving's
    business, and would only confuse converters that see the whole function library.
    """
    import tensorflow as tf

    from tnflow.tasks.model import ServingInput, build, open_session

    net = build(ModelSpec.from_meta(meta), serving=ServingInput(bytes_input=False))
    with open_session(net) as session:
        net.model_saver.restore(session, str(model_dir / CHECKPOINT))
        return tf.compat.v1.graph_util.convert_variables_to_constants(
            session, net.graph.as_graph_def(), [net.probs.op.name]
        )


def saved_model_probabilities(saved: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """The SavedModel's `serving_default` probabilities for a uint8 batch."""
    import tensorflow as tf

    serving = tf.saved_model.load(str(saved)).signatures["serving_default"]
    return lambda images: serving(images=tf.constant(images))["probabilities"].numpy()


def probe_images(size: int, count: int = _PROBES) -> np.ndarray:
    """Fixed uint8 pictures (smooth gradients with noise) to compare runtimes on."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2 + rng.normal(0, 40, (count, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def _compare(
    fmt: str, run: Callable[[np.ndarray], np.ndarray], saved: Path, meta: dict[str, Any], exact: bool = True
) -> dict[str, Any]:
    images = probe_images(meta["image_size"])
    want = saved_model_probabilities(saved)(images)
    got = np.asarray(run(images))
    difference = float(np.max(np.abs(want - got)))
    same_top1 = bool(np.array_equal(want.argmax(1), got.argmax(1)))
    if exact and difference > TOLERANCE:
        raise TnflowError(
            f"the {fmt} export of {meta['model']} differs from the SavedModel by {difference:.2g} "
            f"(over {TOLERANCE:g}); it was not written. Please report this with the model's model.json"
        )
    return {"file": FILES[fmt], "max_difference": difference, "same_top1": same_top1, "probes": len(images)}


def _record_check(target: Path, fmt: str, check: dict[str, Any]) -> None:
    path = target / "exports.json"
    checks = json.loads(path.read_text()) if path.is_file() else {}
    checks[fmt] = check
    write_atomic(path, json.dumps(checks, indent=2))


def _read_check(target: Path, fmt: str) -> dict[str, Any]:
    path = target / "exports.json"
    checks = json.loads(path.read_text()) if path.is_file() else {}
    return checks.get(fmt, {"file": FILES[fmt]})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# -- the run's model directory ------------------------------------------------------------


def publish_model(
    model_dir: str | Path, run_dir: str | Path, formats: tuple[str, ...], card: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """<run dir>/model: the trained model, its exports and its card, put in place in one rename."""
    shared, checks = exports_of(model_dir, formats) if formats else (None, {})
    final = Path(run_dir) / "model"
    with new_directory(final) as tmp:  # hard links: no extra space
        link_tree(model_dir, tmp)
        for check in checks.values():
            source = shared / check["file"]
            if source.is_dir():
                link_tree(source, tmp / check["file"])
            else:
                link_or_copy(source, tmp / check["file"])
        if shared is not None:
            link_or_copy(shared / LABELS, tmp / LABELS)
        update_model_json(tmp, {"card": {**card, "exports": checks}})
        write_card(tmp)
    return final, checks


def export_into_model_dir(model_dir: str | Path, formats: tuple[str, ...]) -> dict[str, Any]:
    """`tnflow export`: the formats written into the model directory itself, and its card rendered again."""
    model_dir = Path(model_dir)
    checks = export(model_dir, formats)
    with exclusive(model_dir / ".card"):  # two exports at once must not lose each other's entry
        card = read_model_dir(model_dir).get("card") or {}
        update_model_json(model_dir, {"card": {**card, "exports": {**card.get("exports", {}), **checks}}})
        write_card(model_dir)
    return checks


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="export",
    cache_policy=NO_CACHE,  # writes this run's model directory; the exports themselves are made once
    retries=1,
    retry_condition_fn=retry_unless(TnflowError),
    **STAGE_HOOKS,
)
def export_task(
    model_dir: str, run_dir: str, cache_path: str, formats: tuple[str, ...], weights: dict[str, Any]
) -> str:
    """<run dir>/model with the exports asked for and the model card; returns its path."""
    logger = get_run_logger()
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    card = card_data(read_model_dir(model_dir), metrics, cache_path, data_sections(cache_path), weights)
    final, checks = publish_model(model_dir, run_dir, formats, card)
    for fmt, check in checks.items():
        difference = check.get("max_difference")
        note = "" if difference is None else f" (max probability difference {difference:.1e} from the SavedModel)"
        logger.info("exported %s: %s%s", fmt, final / check["file"], note)
    return str(final)
