"""Exports: a SavedModel that TensorFlow alone serves, ONNX and TFLite that agree with it, the model card."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tnflow.tasks.tf.converters as converters
from tests.fake_weights import write_fake_weights
from tests.fakes import make_archive
from tests.folders import sample_archive
from tnflow.flows.cli.main import main
from tnflow.tasks.cache.stage import build_cache
from tnflow.tasks.config.specs import CacheSpec, ModelSpec, TrainSettings
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import link_tree
from tnflow.tasks.release.export import export
from tnflow.tasks.release.predict import predict_files
from tnflow.tasks.release.significance import wilson_interval
from tnflow.tasks.sources.images import load_square
from tnflow.tasks.tf.converters import probe_images, saved_model_probabilities, tflite_runner
from tnflow.tasks.tf.decode_graph import decode_square
from tnflow.tasks.tf.model_files import update_model_json, write_model_json
from tnflow.tasks.training.train import train

SIZE = 32


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def real_jpegs(count: int) -> list[bytes]:
    with tarfile.open(sample_archive()) as archive:
        members = [m for m in archive if m.isfile() and m.name.endswith(".jpg")][:count]
        return [archive.extractfile(m).read() for m in members]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """MobileNet v2 0.35 (batch norm, depthwise, relu6) with flip TTA, one epoch at 32 px; its SavedModel.

    It starts from fake pretrained weights (He-scaled, BN statistics near 1): from random
    weights with a few BN steps, MobileNet's output would not depend on the picture, and
    agreement between runtimes would prove nothing.
    """
    root = tmp_path_factory.mktemp("export")
    _, md5 = make_archive(root / "c10.tar.gz", n_train=100, n_test=40)
    cache = build_cache(root / "c10.tar.gz", md5, CacheSpec("cifar10", SIZE, 40, None, None, 0), root / "cache")
    spec = ModelSpec("mobilenet35v2", "gap", 10, SIZE, "flip")
    write_fake_weights(root / "w.npz", "mobilenet35v2")
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=1e-3)
    trained = train(cache.path, str(root / "w.npz"), spec, settings, root / "work", class_names=cache.class_names)
    # Fitted on validation, this near-chance model's temperature is large and flattens its
    # answers; a sharpening one (below 1) keeps them visibly dependent on the picture, and
    # every export must divide by it as `tnflow predict` does.
    assert json.loads((Path(trained.model_dir) / "model.json").read_text())["temperature"] > 0
    update_model_json(Path(trained.model_dir), {"temperature": 0.5})
    exports = root / "exports"
    exports.mkdir()
    export(trained.model_dir, ("savedmodel",), exports)
    files = []
    for i, data in enumerate(real_jpegs(6)):
        files.append(root / f"real-{i}.jpg")
        files[-1].write_bytes(data)
    photo = Image.fromarray(probe_images(90)[0]).resize((90, 60))
    files.append(root / "photo.png")
    photo.save(files[-1])
    return {"dir": trained.model_dir, "exports": exports, "files": [str(f) for f in files], "root": root}


@pytest.mark.slow
def test_the_saved_model_needs_tensorflow_alone_and_agrees_with_tnflow_predict(model):
    """Both signatures, in a process that imports neither tnflow nor tensornets."""
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import tensorflow as tf
        from PIL import Image
        saved, files = sys.argv[1], sys.argv[2:]
        loaded = tf.saved_model.load(saved)
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files if f.endswith(".jpg")])
        by_array = loaded.signatures["serving_default"](images=tf.constant(images))
        by_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant([open(f, "rb").read() for f in files]))
        assert not [m for m in sys.modules if m.startswith(("tnflow", "tensornets"))], "imported tnflow or tensornets"
        print(json.dumps({
            "arrays": by_array["probabilities"].numpy().tolist(),
            "bytes": by_bytes["probabilities"].numpy().tolist(),
            "top_class": [c.decode() for c in by_bytes["top_class"].numpy()],
            "classes": [c.decode() for c in by_bytes["classes"].numpy()[0]],
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(model["exports"] / "saved_model"), *model["files"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    predicted = list(predict_files(model["dir"], model["files"], top=10))
    names = (model["exports"] / "labels.txt").read_text().splitlines()
    assert served["classes"] == names
    assert np.ptp(np.max(served["bytes"], axis=1)) > 0.01, "the model's answers depend on the picture"
    for row, result in zip(served["bytes"], predicted, strict=True):
        assert names[int(np.argmax(row))] == result["top"][0]["class"]
        for top in result["top"]:
            assert abs(row[names.index(top["class"])] - top["probability"]) < 1e-5
    assert served["top_class"] == [r["top"][0]["class"] for r in predicted]
    jpeg_rows = [row for row, f in zip(served["bytes"], model["files"], strict=True) if f.endswith(".jpg")]
    np.testing.assert_allclose(served["arrays"], jpeg_rows, atol=1e-5, err_msg="a CIFAR-size JPEG needs no resizing")


@pytest.mark.slow
def test_onnx_and_tflite_agree_with_the_saved_model(model):
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    checks = export(model["dir"], ("onnx", "tflite", "tflite-float16"), model["exports"])
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == level, "tf2onnx's log level must not reach later children"
    assert checks["onnx"]["max_difference"] <= 1e-4 and checks["tflite"]["max_difference"] <= 1e-4
    import onnxruntime

    images = np.stack([load_square(f, SIZE) for f in model["files"]])
    want = saved_model_probabilities(model["exports"] / "saved_model")(images)
    session = onnxruntime.InferenceSession(str(model["exports"] / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(onnx, want, atol=1e-4)
    np.testing.assert_allclose(tflite_runner(model["exports"] / "model.tflite")(images), want, atol=1e-4)
    half = tflite_runner(model["exports"] / "model.float16.tflite")(images)
    assert np.array_equal(half.argmax(1), want.argmax(1)), "float16 weights keep every top-1 on these images"
    assert (model["exports"] / "model.float16.tflite").stat().st_size < 0.6 * (
        model["exports"] / "model.tflite"
    ).stat().st_size


@pytest.mark.slow
def test_a_format_that_cannot_express_the_model_says_so_and_leaves_nothing(model, tmp_path, monkeypatch):
    with converters._environment_kept("TF_CPP_MIN_LOG_LEVEL"):
        import tf2onnx

    def refuses(*args, **kwargs):
        raise ValueError("Unsupported ops: Relu6Grad\nmore detail")

    monkeypatch.setattr(tf2onnx.convert, "from_graph_def", refuses)
    target = tmp_path / "out"
    target.mkdir()
    (target / "saved_model").symlink_to(model["exports"] / "saved_model")
    with pytest.raises(
        TnflowError,
        match=r"^ONNX cannot express mobilenet35v2: Unsupported ops: Relu6Grad; leave onnx out of --export$",
    ):
        export(model["dir"], ("onnx",), target)
    assert sorted(p.name for p in target.iterdir()) == ["saved_model"]


def test_without_the_onnx_extra_the_message_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import fails as if not installed
    with pytest.raises(TnflowError, match=r"pip install 'tnflow\[onnx\]'"):
        converters._write_onnx(converters.Source(tmp_path, {"model": "vgg19"}, tmp_path), tmp_path / "x.onnx")


@pytest.mark.slow
def test_tnflow_export_writes_into_the_model_dir_and_renders_its_card(model, tmp_path, capsys):
    copy = tmp_path / "model"
    link_tree(model["dir"], copy)
    link_tree(model["exports"] / "saved_model", copy / "saved_model")  # made by the fixture: not made again
    assert main(["export", str(copy), "--format", "tflite", "--float16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(copy.resolve())
    assert (copy / "model.float16.tflite").is_file() and (copy / "saved_model" / "saved_model.pb").is_file()
    assert not (copy / "model.tflite").exists()
    card = (copy / "model_card.md").read_text()
    assert "model.float16.tflite" in card and "tf.saved_model.load" in card
    assert json.loads((copy / "model.json").read_text())["card"]["exports"]["tflite-float16"]["same_top1"] is True

    assert main(["export", str(copy), "--format", "pytorch"]) == 2
    assert "--format 'pytorch': pytorch is not a format" in capsys.readouterr().err


def test_an_interrupted_export_leaves_nothing_finished_and_the_next_one_completes(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    meta = {"model": "vgg19", "head": "gap", "num_classes": 2, "image_size": 32, "class_names": ["a", "b"]}
    write_model_json(model, meta)
    (model / "model.ckpt.index").write_bytes(b"index")
    calls = []

    def killed(source, tmp):
        tmp.mkdir()
        (tmp / "saved_model.pb").write_bytes(b"half")
        raise KeyboardInterrupt("stopped halfway")

    def whole(source, tmp):
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "saved_model.pb").write_bytes(b"whole")
        return {"file": "saved_model", "signatures": ["serving_bytes", "serving_default"]}

    monkeypatch.setitem(converters.WRITERS, "savedmodel", killed)
    with pytest.raises(KeyboardInterrupt):
        export(model, ("savedmodel",))
    assert not (model / "saved_model").exists() and not list(model.glob("saved_model*"))
    (model / "saved_model.tmp-999-deadbeef").mkdir()  # left by a process killed with SIGKILL

    monkeypatch.setitem(converters.WRITERS, "savedmodel", whole)
    assert export(model, ("savedmodel",))["savedmodel"]["signatures"] == ["serving_bytes", "serving_default"]
    assert sorted(p.name for p in model.glob("saved_model*")) == ["saved_model"], "the dead temp is gone"
    assert (model / "saved_model" / "saved_model.pb").read_bytes() == b"whole"
    assert (model / "labels.txt").read_text() == "a\nb\n"
    export(model, ("savedmodel",))
    assert len(calls) == 1, "a finished export is not made again"


# -- serving_bytes decodes as the cache does -------------------------------------------------


def pictures() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 640 * 480 * 3).reshape(480, 640, 3)
    photo = Image.fromarray(np.clip(ramp + rng.integers(0, 60, (480, 640, 3)), 0, 255).astype(np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8), "RGBA")
    jpeg, jpeg2 = real_jpegs(2)
    return {
        "cifar-jpeg": jpeg,
        "cifar-jpeg-2": jpeg2,
        "photo-jpeg": encoded(photo, "JPEG", quality=90),  # decoded at half scale, as Pillow's draft does
        "huge-jpeg": encoded(photo.resize((3000, 2000)), "JPEG"),  # at an eighth
        "odd-png": encoded(photo.resize((337, 229)), "PNG"),  # a box filter edge on a pixel centre
        "small-png": encoded(photo.resize((40, 30)), "PNG"),
        "rgba-png": encoded(rgba, "PNG"),  # composited on white
        "grey-png": encoded(photo.convert("L").resize((300, 250)), "PNG"),
        "gif": encoded(photo.resize((300, 200)), "GIF"),
        "bmp": encoded(photo.resize((301, 227)), "BMP"),
    }


@pytest.fixture(scope="module")
def decoded_pictures():
    return pictures()


@pytest.mark.parametrize("resize", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("size", [32, 224])
def test_serving_bytes_squares_pictures_as_the_cache_within_one_grey_level(decoded_pictures, resize, size):
    for name, data in decoded_pictures.items():
        want = load_square(data, size, resize).astype(int)
        got = decode_square(tf.constant(data), size, resize, 10**8).numpy().astype(int)
        assert got.shape == (size, size, 3)
        assert np.abs(want - got).max() <= 1, f"{name}: {np.abs(want - got).max()} grey levels apart"
        assert np.mean(want != got) < 1e-3, f"{name}: {np.mean(want != got):.2%} of values differ"


def test_pictures_over_the_pixel_limit_are_refused_from_their_header(decoded_pictures):
    for name in ("huge-jpeg", "odd-png", "gif", "bmp"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 10,000 pixels"):
            decode_square(tf.constant(decoded_pictures[name]), 32, "crop", 10_000)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP"):
        decode_square(tf.constant(b"II*\x00 a TIFF is not served"), 32, "crop", 10**8)


# -- the model card --------------------------------------------------------------------------


def test_the_confidence_interval_is_wilsons():
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and round(low, 4) == 0.963
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_full_disk_while_publishing_the_model_is_one_line_and_leaves_no_model(tmp_path, monkeypatch):
    import errno

    import tnflow.tasks.release.export as export_module
    from tests.test_promote import fake_model
    from tnflow.tasks.core.errors import DiskFullError

    def no_space(directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model_card.md"))

    monkeypatch.setattr(export_module, "write_card", no_space)
    with pytest.raises(DiskFullError, match=r"^no space left on .*model_card.md while exporting the model; free space"):
        export_module.publish_model(fake_model(tmp_path, "m"), tmp_path / "run", (), {"data": {}})
    assert not (tmp_path / "run" / "model").exists() and not list((tmp_path / "run").glob("model.tmp-*"))


@pytest.mark.slow  # the model fixture: built once for the slow export tests
def test_a_full_disk_while_exporting_is_one_line_naming_where(model, small_disk, monkeypatch, capsys):
    import shutil

    size = sum(path.stat().st_size for path in Path(model["dir"]).rglob("*") if path.is_file())
    disk = small_disk(size // 1024 + 256)  # the model fits; its SavedModel does not
    if disk is None:  # no mount on this machine: ENOSPC at the write call
        import errno

        import tnflow.tasks.release.export as export_module

        def full(source, tmp):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setitem(export_module.WRITERS, "savedmodel", full)
        disk = model["root"] / "no-mount"
    copy = disk / "model"
    shutil.copytree(model["dir"], copy)
    assert main(["export", str(copy), "--format", "savedmodel"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tnflow export: error: no space left on {copy}"), err
    assert "while exporting the model; free space and run again" in err[0], err
    assert sorted(path.name for path in copy.iterdir()) == sorted(path.name for path in Path(model["dir"]).iterdir())
