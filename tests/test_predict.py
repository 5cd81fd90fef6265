"""`tnflow predict`: the same answers as validation, in bounded batches, per-image errors, every image mode."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.complexity import assert_linear
from tests.fakes import make_archive
from tests.png16 import write_png16
from tests.readers import load_rgb
from tnflow.flows.cli.main import main
from tnflow.tasks.cache.stage import build_cache
from tnflow.tasks.config.specs import CacheSpec, ModelSpec, TrainSettings
from tnflow.tasks.release.predict import load_image, write_predictions, write_to_label
from tnflow.tasks.sources.images import ImageError
from tnflow.tasks.training.train import train
from tnflow.tasks.training.validate import validate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch gap-head model at 32 px, its validation metrics, and the test images as PNGs.

    It trains on 40 pictures: what it learnt is not these tests' point, only that it is a model.
    """
    root = tmp_path_factory.mktemp("predict")
    fake, md5 = make_archive(root / "c10.tar.gz", n_train=60, n_test=40)
    cache = build_cache(root / "c10.tar.gz", md5, CacheSpec("cifar10", 32, 20, None, None, 0), root / "cache")
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=1e-4)
    model = train(
        cache.path, None, ModelSpec("vgg19", "gap", 10, 32), settings, root / "work", class_names=cache.class_names
    )
    metrics = validate(model.model_dir, cache.path, "test", 16, root / "run").read_figures()
    pngs = []
    for i, image in enumerate(fake.test_images[:8]):
        pngs.append(str(root / f"test-{i}.png"))
        Image.fromarray(image).save(pngs[-1])
    names = list(cache.class_names)
    return {"model_dir": model.model_dir, "metrics": metrics, "pngs": pngs, "names": names, "cache": cache.path}


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [3, 32], ids=["batches-of-3", "one-batch"])
def test_predict_agrees_with_validation(trained, capsys, batch_size):
    assert main(["predict", trained["model_dir"], *trained["pngs"], "--json", "--batch-size", str(batch_size)]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = [trained["names"][sample["top"][0][0]] for sample in trained["metrics"]["samples"]]
    assert [r["top"][0]["class"] for r in results] == expected
    for result, sample in zip(results, trained["metrics"]["samples"], strict=True):
        assert len(result["top"]) == 3
        assert abs(result["top"][0]["probability"] - sample["top"][0][1]) < 1e-4


@pytest.mark.slow
def test_prints_three_classes_per_image(trained, capsys):
    assert main(["predict", trained["model_dir"], trained["pngs"][0]]) == 0
    line = capsys.readouterr().out.strip()
    image, _, classes = line.partition(": ")
    assert image == trained["pngs"][0] and len(classes.split(", ")) == 3
    assert all(name in trained["names"] and 0 <= float(p) <= 1 for name, p in (c.split() for c in classes.split(", ")))


@pytest.mark.slow
def test_a_bad_image_does_not_stop_the_others(trained, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    images = [trained["pngs"][0], str(tmp_path / "missing.png"), str(tmp_path / "broken.png"), trained["pngs"][1]]
    code = main(["predict", trained["model_dir"], *images, "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split(": ")[0] for line in out.strip().splitlines()] == [trained["pngs"][0], trained["pngs"][1]]
    assert "missing.png" in err and "broken.png" in err and "2 of 4 images could not be read" in err.splitlines()[-1]


@pytest.mark.slow
def test_a_folder_is_scored_recursively_into_a_csv(trained, tmp_path, capsys):
    folder = tmp_path / "inbox"
    (folder / "2026" / "nov").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for i, png in enumerate(trained["pngs"][:5]):
        (folder / ("2026/nov" if i % 2 else "") / f"p{i}.png").write_bytes(Path(png).read_bytes())
    (folder / "2026" / "readme.txt").write_text("not a picture")
    (folder / ".cache" / "p9.png").write_bytes(Path(trained["pngs"][5]).read_bytes())  # hidden: not scored
    out = tmp_path / "scores" / "predictions.csv"
    assert main(["predict", trained["model_dir"], str(folder), "--out", str(out), "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out), "the CSV is complete all the same"
    assert captured.err.strip().splitlines()[-1] == (
        f"tnflow predict: error: 1 of 6 files could not be read: the error column of {out} says why"
    )
    rows = list(csv.DictReader(out.open()))
    names = [Path(r["path"]).name for r in rows]
    assert names == ["p0.png", "p2.png", "p4.png", "readme.txt", "p1.png", "p3.png"], (
        "a folder's files, then its folders"
    )
    bad = rows.pop(3)
    assert bad["error"].startswith("cannot read") and "not an image" in bad["error"] and not bad["class"]
    expected = {f"p{i}.png": trained["names"][s["top"][0][0]] for i, s in enumerate(trained["metrics"]["samples"])}
    for row in rows:
        top3 = [part.rsplit(" ", 1) for part in row["top3"].split("; ")]
        assert row["class"] == top3[0][0] == expected[Path(row["path"]).name] and len(top3) == 3
        assert float(row["probability"]) == pytest.approx(float(top3[0][1]), abs=1e-4)
    assert "(unreadable) 1" in captured.err
    assert not list(out.parent.glob("*.tmp-*")), "no temporary file is left"
    # what the batch-predict flow writes beside its CSV, the command writes too (one way to score a folder)
    to_label = list(csv.DictReader(out.with_suffix(".to_label.csv").open()))
    confidence = [float(r["probability"]) for r in to_label]
    assert sorted(r["path"] for r in to_label) == sorted(r["path"] for r in rows), "every scored picture"
    assert confidence == sorted(confidence), "least confident first"
    assert f"the least confident, to label next: {out.with_suffix('.to_label.csv')}" in captured.err


@pytest.mark.slow  # a process of its own: the hang was in the interpreter's exit
def test_a_file_name_that_is_not_utf8_is_scored_and_written_escaped_in_a_process_that_ends(trained, tmp_path):
    """The CSV writer's UnicodeEncodeError left the process hanging (issue 29); TensorFlow's start-up lines stay off."""
    import os
    import subprocess
    import sys

    tnflow = str(Path(sys.executable).with_name("tnflow"))
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / os.fsdecode(b"x\xff.png")).write_bytes(Path(trained["pngs"][0]).read_bytes())  # Latin-1 bytes
    (folder / "plain.png").write_bytes(Path(trained["pngs"][1]).read_bytes())
    out = tmp_path / "p.csv"
    command = [tnflow, "predict", trained["model_dir"], str(folder), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == str(out), done.stderr[-2000:]
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(Path(r["path"]).name for r in rows) == ["plain.png", "x\\xff.png"] and all(r["class"] for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inbox", "p.csv", "p.to_label.csv"], "no lock or temporary"
    for chatter in ("cuInit", "oneDNN", "cuda drivers", "is deprecated", "Traceback"):
        assert chatter not in done.stderr, f"start-up chatter on the console: {chatter}"


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_printed_escaped(trained, tmp_path, capsys):
    import os

    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / os.fsdecode(b"x\xff.png")).write_bytes(Path(trained["pngs"][0]).read_bytes())
    assert main(["predict", trained["model_dir"], str(folder)]) == 0
    assert f"{folder}/x\\xff.png: " in capsys.readouterr().out


class FailingWriter:
    """A CSV writer whose third row (the header, then the first picture, then the second) fails with `error`."""

    error: BaseException

    def __init__(self, handle):
        self.rows = 0

    def writerow(self, row):
        self.rows += 1
        if self.rows == 3:
            raise self.error


@pytest.mark.slow
def test_a_full_disk_while_writing_the_csv_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import tnflow.tasks.release.predict as predict

    monkeypatch.setattr(FailingWriter, "error", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), raising=False)
    monkeypatch.setattr(predict.csv, "writer", FailingWriter)
    out = tmp_path / "scores" / "p.csv"
    assert main(["predict", trained["model_dir"], *trained["pngs"][:4], "--out", str(out)]) == 1
    assert list(out.parent.iterdir()) == [], "no partial CSV, no temporary file, no lock"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tnflow predict: error: no space left on {out} while writing the --out CSV"), last


@pytest.mark.slow  # a process of its own: the hang was in the interpreter's exit
def test_a_bug_in_the_csv_write_ends_the_process_and_leaves_nothing(trained, tmp_path):
    """A bug's traceback kept the suspended prediction generator, and its TensorFlow session, alive
    until the interpreter's exit, whose session close then waited for ever (issue 29).
    """
    import subprocess
    import sys

    child = (
        "import sys\n"
        "import tnflow.tasks.release.predict as predict\n"
        "class Failing:\n"
        "    def __init__(self, handle): self.rows = 0\n"
        "    def writerow(self, row):\n"
        "        self.rows += 1\n"
        "        if self.rows == 3: raise ValueError('a bug')\n"
        "predict.csv.writer = Failing\n"
        "from tnflow.flows.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "scores" / "p.csv"
    command = [sys.executable, "-c", child, "predict", trained["model_dir"], *trained["pngs"][:4], "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)  # a hang fails here
    assert done.returncode == 1, done.stderr[-2000:]
    assert "ValueError: a bug" in done.stderr, done.stderr[-2000:]
    assert list(out.parent.iterdir()) == [], "no partial CSV, no temporary file, no lock"


def test_scoring_a_path_that_does_not_exist(trained, tmp_path, capsys):
    assert main(["predict", trained["model_dir"], str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.csv")]) == 1
    assert "nowhere does not exist; give image files or folders of them" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_an_empty_folder_fails_the_command_but_gives_the_nightly_job_a_csv_with_its_header_only(
    trained, tmp_path, capsys
):
    from tnflow.tasks.release.predict import score

    (tmp_path / "inbox").mkdir()
    assert main(["predict", trained["model_dir"], str(tmp_path / "inbox"), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"tnflow predict: error: no files in {tmp_path / 'inbox'}; give image files, or folders that hold some"
    ]
    assert not (tmp_path / "p.csv").exists(), "as without --out: nothing asked for was scored"
    assert score(trained["model_dir"], [str(tmp_path / "inbox")], tmp_path / "p.csv") == {}  # tonight's empty inbox
    assert (tmp_path / "p.csv").read_text().strip() == "path,class,probability,margin,entropy,top3,error"


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_an_out_that_cannot_be_written_is_one_line(trained, tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    out = tmp_path / "file" / "p.csv" if where == "under-a-file" else tmp_path / "dir"
    assert main(["predict", trained["model_dir"], trained["pngs"][0], "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    said = {
        "under-a-file": f"--out {out.parent} is not a writable directory (it is a file); choose another with --out",
        "a-directory": f"--out {out} is a directory; give the CSV's file name ({out / 'predictions.csv'})",
    }[where]
    assert err == [f"tnflow predict: error: {said}"]


def test_printing_the_classes_of_an_empty_folder_fails_in_one_line(trained, tmp_path, capsys):
    (tmp_path / "inbox").mkdir()
    assert main(["predict", trained["model_dir"], str(tmp_path / "inbox")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"tnflow predict: error: no files in {tmp_path / 'inbox'}; give image files, or folders that hold some"
    ]


@pytest.mark.parametrize("damage", ["missing", "truncated", "another-save", "garbled"])
def test_a_damaged_checkpoint_is_one_line_wherever_the_model_is_read(trained, tmp_path, capsys, damage):
    """predict, export, the gate's re-scoring (validate) and --init-from: no TensorFlow traceback."""
    import shutil

    from tnflow.tasks.core.errors import TnflowError
    from tnflow.tasks.tf.model_files import check_can_start_from

    copy = tmp_path / "model"
    shutil.copytree(trained["model_dir"], copy)
    (data,) = copy.glob("model.ckpt.data-*")
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "another-save":
        data.write_bytes(data.read_bytes() + bytes(8))
    else:  # the right size, other bytes: only TensorFlow's checksums see it, while restoring
        data.write_bytes(bytes(255 - b for b in data.read_bytes()))
    said = {
        "missing": f"has no data file {data.name}",
        "truncated": "where its index names",
        "another-save": "where its index names",
        "garbled": "TensorFlow cannot restore it",
    }[damage]
    for command in (["predict", str(copy), trained["pngs"][0]], ["export", str(copy), "--format", "savedmodel"]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"tnflow {command[0]}: error: the model directory {copy}"), err
        assert said in err[0] and "copy the model directory again" in err[0], err
    assert not (copy / "saved_model").exists()
    with pytest.raises(TnflowError, match=said):
        validate(str(copy), trained["cache"], "test", 16, tmp_path / "run")
    if damage != "garbled":  # a check of sizes, before the run waits for a GPU; the restore itself says the rest
        with pytest.raises(TnflowError, match=said):
            check_can_start_from(copy, "vgg19", "gap", trained["names"])


def test_no_champion_yet(tmp_path, capsys):
    assert main(["predict", "champion", "x.png", "--output-dir", str(tmp_path)]) == 1
    assert "there is no champion in" in capsys.readouterr().err


def test_a_directory_that_is_not_a_model(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.png"]) == 1
    assert "is not a tnflow model directory" in capsys.readouterr().err


def test_a_bad_batch_size(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.png", "--batch-size", "0"]) == 2
    assert "--batch-size must be an integer of at least 1" in capsys.readouterr().err


def test_the_csv_and_the_pictures_to_label_are_one_pass_over_the_scored_pictures(tmp_path):
    """`predict --out` and the batch job on 50,000 pictures: rows, counts, least-confident list, pinned linear."""
    rng = np.random.default_rng(0)

    def scoring(n: int):
        confidence = rng.random(n)
        results = [
            {"image": f"/inbox/{i:06d}.jpg", "error": "not an image"}
            if i % 97 == 0
            else {
                "image": f"/inbox/{i:06d}.jpg",
                "top": [{"class": f"class-{(i + k) % 10}", "probability": confidence[i] / (k + 1)} for k in range(3)],
                "margin": confidence[i] / 2,
                "entropy": 1 - confidence[i],
            }
            for i in range(n)
        ]

        def write() -> None:
            seen: list = []
            write_predictions(results, tmp_path / f"scores-{n}.csv", seen)
            write_to_label(seen, tmp_path / f"label-{n}.csv", 50)

        return write

    assert_linear(scoring, 2000)
    rows = list(csv.DictReader((tmp_path / "scores-8000.csv").open()))
    assert len(rows) == 8000 and sum(bool(r["error"]) for r in rows) == len(range(0, 8000, 97))
    least = list(csv.DictReader((tmp_path / "label-8000.csv").open()))
    readable = sorted(float(r["probability"]) for r in rows if not r["error"])
    assert [float(r["probability"]) for r in least] == pytest.approx(readable[:50], abs=1e-6)


# -- every image mode --------------------------------------------------------------------

RED_ON_WHITE = np.array([255, 0, 0], dtype=np.uint8)


def _save(path, array, mode=None, **params):
    Image.fromarray(array, mode).save(path, **params) if mode else Image.fromarray(array).save(path, **params)
    return path


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    write_png16(tmp_path / "g16.png", np.full((8, 8), 40000, np.uint16))
    assert np.all(load_rgb(tmp_path / "g16.png") == 40000 >> 8), "16-bit grey used to come out white"


def test_sixteen_bit_rgb(tmp_path):
    write_png16(tmp_path / "rgb16.png", np.full((8, 8, 3), [65535, 32768, 0], np.uint16))
    assert np.all(load_rgb(tmp_path / "rgb16.png") == [255, 128, 0])


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 1  # colour 1 (blue) is transparent
    image.save(tmp_path / "p.png", transparency=1)
    rgb = load_rgb(tmp_path / "p.png")
    assert np.all(rgb[0, 0] == 255) and np.all(rgb[1, 1] == RED_ON_WHITE)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    array = np.zeros((4, 4, 4 if mode == "RGBA" else 2), np.uint8)  # fully transparent black
    rgb = load_rgb(_save(tmp_path / "a.png", array, mode))
    assert np.all(rgb == 255)


def test_cmyk_jpeg_and_exif_rotation(tmp_path):
    Image.new("CMYK", (6, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    rgb = load_rgb(tmp_path / "c.jpg")
    assert rgb.shape == (2, 6, 3) and rgb[0, 0, 0] > 200 and rgb[0, 0, 1] < 60
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.new("RGB", (6, 2), (0, 0, 255)).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").shape == (6, 2, 3)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    Image.new("L", (3000, 2000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="over the limit"):
        load_rgb(tmp_path / "big.png", max_pixels=1_000_000)


@pytest.mark.parametrize(
    "shape", [(32, 32), (32, 32, 4), (100, 60, 3), (16, 16, 3)], ids=["grey", "rgba", "large-oblong", "small"]
)
def test_any_image_becomes_the_models_input(tmp_path, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    loaded = load_image(_save(tmp_path / "x.png", image), 64)
    assert loaded.shape == (64, 64, 3) and loaded.dtype == np.uint8
    if shape == (32, 32):
        assert np.array_equal(loaded[..., 0], loaded[..., 2]), "grey stays grey"
