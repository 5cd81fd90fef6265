"""`tnflow predict`: the same answers as validation, per-image errors, any image mode."""

import json

import numpy as np
import pytest
from skimage import io

from flows.cli import main
from tasks.cache import build_cache
from tasks.config import CacheSpec
from tasks.model_dir import ModelSpec
from tasks.predict import load_image
from tasks.train import TrainSettings, train
from tasks.validate import validate
from tests.fakes import make_archive


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch gap-head model at 32 px, its validation metrics, and the test images as PNGs."""
    root = tmp_path_factory.mktemp("predict")
    fake, md5 = make_archive(root / "c10.tar.gz", n_train=300, n_test=40)
    cache = build_cache(root / "c10.tar.gz", md5, CacheSpec("cifar10", 32, 60, None, None, 0), root / "cache")
    settings = TrainSettings(epochs=1, batch_size=32, eval_batch_size=64, learning_rate=1e-4)
    model = train(
        cache.path, None, ModelSpec("vgg19", "gap", 10, 32), settings, root / "work", class_names=cache.class_names
    )
    metrics = validate(model.model_dir, cache.path, "test", 16, root / "run")
    pngs = []
    for i, image in enumerate(fake.test_images[:8]):
        pngs.append(str(root / f"test-{i}.png"))
        io.imsave(pngs[-1], image, check_contrast=False)
    return {"model_dir": model.model_dir, "metrics": metrics, "pngs": pngs, "names": list(cache.class_names)}


def test_predict_agrees_with_validation(trained, capsys):
    assert main(["predict", trained["model_dir"], *trained["pngs"], "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = [trained["names"][sample["top"][0][0]] for sample in trained["metrics"]["samples"]]
    assert [r["top"][0]["class"] for r in results] == expected
    for result, sample in zip(results, trained["metrics"]["samples"], strict=True):
        assert len(result["top"]) == 3
        assert abs(result["top"][0]["probability"] - sample["top"][0][1]) < 1e-4


def test_prints_three_classes_per_image(trained, capsys):
    assert main(["predict", trained["model_dir"], trained["pngs"][0]]) == 0
    line = capsys.readouterr().out.strip()
    image, _, classes = line.partition(": ")
    assert image == trained["pngs"][0] and len(classes.split(", ")) == 3
    assert all(name in trained["names"] and 0 <= float(p) <= 1 for name, p in (c.split() for c in classes.split(", ")))


def test_a_bad_image_does_not_stop_the_others(trained, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    images = [trained["pngs"][0], str(tmp_path / "missing.png"), str(tmp_path / "broken.png"), trained["pngs"][1]]
    code = main(["predict", trained["model_dir"], *images])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split(": ")[0] for line in out.strip().splitlines()] == [trained["pngs"][0], trained["pngs"][1]]
    assert "missing.png" in err and "broken.png" in err and "2 of 4 images could not be read" in err.splitlines()[-1]


def test_a_directory_that_is_not_a_model(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.png"]) == 1
    assert "is not a tnflow model directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "shape", [(32, 32), (32, 32, 4), (100, 60, 3), (16, 16, 3)], ids=["grey", "rgba", "large-oblong", "small"]
)
def test_any_image_becomes_the_models_input(tmp_path, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    io.imsave(tmp_path / "x.png", image, check_contrast=False)
    loaded = load_image(tmp_path / "x.png", 64)
    assert loaded.shape == (64, 64, 3) and loaded.dtype == np.uint8
    if shape == (32, 32):
        assert np.array_equal(loaded[..., 0], loaded[..., 2]), "grey stays grey"
