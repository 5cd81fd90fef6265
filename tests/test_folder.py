"""Image folders: layouts, bad files, duplicates, sticky splits, incremental builds, archives, Dask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.complexity import assert_linear
from tests.folders import make_folder, make_split_folder, picture
from tnflow.tasks.cache.folder_cache import build_folder_cache
from tnflow.tasks.cache.h5cache import read_manifest, read_split_assignment, training_content
from tnflow.tasks.config.options import DataConfig
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.release.data_summary import data_sections
from tnflow.tasks.sources import folder as folder_module
from tnflow.tasks.sources.archives import UNSAFE_MEMBER
from tnflow.tasks.sources.folder import scan_folder
from tnflow.tasks.sources.images import load_square


def spec(data_dir, **options):
    values = {"data_dir": str(data_dir), "image_size": 32, "test_size": 0.2, "valid_size": 0.2, **options}
    return DataConfig.from_values(values).cache_spec()


def build(data_dir, cache_dir, **options):
    return build_folder_cache(data_dir, spec(data_dir, **options), cache_dir, workers=2)


def digests(path, split):
    with h5py.File(path, "r") as f:
        return {d.decode() for d in f[f"{split}/digests"][:]}


def summary(info):
    return dict(info.summary)


# -- layouts ------------------------------------------------------------------------------


def test_class_folders_are_split_stratified_and_every_image_lands_once(tmp_path):
    make_folder(tmp_path / "data", classes=3, per_class=20)
    (tmp_path / "data" / "README.md").write_text("my photos")
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "data" / "class-0" / ".thumbs").write_bytes(b"\0")
    info = build(tmp_path / "data", tmp_path / "cache")
    assert info.class_names == ("class-0", "class-1", "class-2")
    assert info.counts == {"train": 36, "valid": 12, "test": 12}
    assert summary(info)["ignored"] == 3 and summary(info)["skipped"] == 0
    with h5py.File(info.path, "r") as f:
        for split in ("train", "valid", "test"):
            assert np.bincount(f[f"{split}/labels"][:]).tolist() == [info.counts[split] // 3] * 3
        paths = [p.decode() for s in ("train", "valid", "test") for p in f[f"{s}/paths"][:]]
        images = f["train/images"][:]
        for row, path in enumerate(f["train/paths"][:]):  # every row is its file's picture
            assert np.array_equal(images[row], load_square(tmp_path / "data" / path.decode(), 32)), path
    assert sorted(paths) == sorted(str(p.relative_to(tmp_path / "data")) for p in (tmp_path / "data").rglob("img-*"))
    assert images.shape[1:] == (32, 32, 3) and images.std() > 10


def test_train_test_val_folders_are_taken_as_given(tmp_path):
    make_split_folder(tmp_path / "data", {"train": 8, "test": 4, "validation": 3})
    info = build(tmp_path / "data", tmp_path / "cache")
    assert info.counts == {"train": 24, "valid": 9, "test": 12}
    with h5py.File(info.path, "r") as f:
        assert all(p.decode().startswith("test/") for p in f["test/paths"][:])


def test_train_and_val_only_is_the_imagenet_convention(tmp_path):
    make_split_folder(tmp_path / "data", {"train": 10, "val": 4})
    info = build(tmp_path / "data", tmp_path / "cache", valid_size=3)
    assert info.counts == {"train": 27, "valid": 3, "test": 12}
    with h5py.File(info.path, "r") as f:
        assert all(p.decode().startswith("val/") for p in f["test/paths"][:])
        assert all(p.decode().startswith("train/") for p in f["valid/paths"][:])


def test_a_class_missing_from_a_split_is_named(tmp_path):
    make_split_folder(tmp_path / "data", {"train": 4, "test": 2})
    shutil.rmtree(tmp_path / "data" / "test" / "class-1")
    with pytest.raises(DataError, match="class 'class-1' has no folder in test/"):
        scan_folder(tmp_path / "data")


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda root: make_folder(root, classes=1, per_class=5), "a classifier needs at least 2"),
        (lambda root: [(root / "a").mkdir(parents=True), (root / "b").mkdir()], "holds no readable images"),
        (
            lambda root: [make_folder(root, 2, 5), *map(os.unlink, list((root / "class-1").iterdir())[1:])],
            r"has 1 class\(es\) with 2 usable pictures or more \('class-0' \(5\), 'class-1' \(1\)\); training needs 2",
        ),
    ],
)
def test_nothing_to_learn_from_is_one_clear_error(tmp_path, arrange, message):
    arrange(tmp_path / "data")
    with pytest.raises(DataError, match=message):
        build(tmp_path / "data", tmp_path / "cache")


def test_a_training_subset_smaller_than_the_classes_blames_the_option(tmp_path):
    make_folder(tmp_path / "data", classes=3, per_class=10)
    with pytest.raises(DataError) as raised:
        build(tmp_path / "data", tmp_path / "cache", limit_train=2)
    assert str(raised.value) == (
        "--limit-train 2 is fewer than the 3 classes, and every class needs a training image; "
        "pass --limit-train 3 or more"
    )


@pytest.mark.parametrize("left", [0, 1])
def test_a_class_folder_without_two_usable_pictures_is_left_out_and_said_unless_strict(tmp_path, caplog, left):
    """A folder made for a new class before it is filled must not stop every retrain."""
    make_folder(tmp_path / "data", classes=3, per_class=10)
    (tmp_path / "data" / "new-class").mkdir()
    if left:
        picture(0, 777).save(tmp_path / "data" / "new-class" / "only.png")
    (tmp_path / "data" / "new-class" / "empty.png").write_bytes(b"")  # skipped as a file, not counted
    info = build(tmp_path / "data", tmp_path / "cache", max_bad=0.05)
    why = f"{left} usable picture{'' if left == 1 else 's'}; a class needs 2 (one to train on, one to test)"
    assert info.class_names == ("class-0", "class-1", "class-2") and sum(info.counts.values()) == 30
    assert read_manifest(info.path)["left_out"] == {"new-class": why}
    assert ("class left out: new-class", why) in data_sections(info.path)["data"]
    assert f"class 'new-class' left out: {why}. This run trains on 3 classes" in caplog.text
    with h5py.File(info.path) as f:
        assert sorted(set(f["train/labels"][:]) | set(f["test/labels"][:])) == [0, 1, 2], "numbered as listed"

    with pytest.raises(DataError) as raised:
        build(tmp_path / "data", tmp_path / "cache", max_bad=0.05, strict_classes=True)
    assert (
        str(raised.value) == f"class 'new-class' has {why}: add pictures, or drop --strict-classes to train without it"
    )


# -- bad files, duplicates, leakage ----------------------------------------------------


def add_bad_files(root: Path) -> dict[str, str]:
    """One file of every bad kind in class-0; returns name -> the reason's key words."""
    folder = root / "class-0"
    good = folder / "img-0000.png"
    jpeg = folder / "truncated.jpg"
    picture(0, 999, (64, 64)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "gone.png").symlink_to(folder / "missing-target.png")  # unreadable: stat fails
    Image.new("RGB", (400, 400)).save(folder / "bomb.png")
    assert good.exists()
    return {
        "truncated.jpg": "runcated",
        "empty.png": "empty file",
        "notes.txt": "not an image",
        "gone.png": "unreadable",
        "bomb.png": "over the limit",
    }


def test_bad_files_are_skipped_and_listed_with_their_reason(tmp_path):
    make_folder(tmp_path / "data", classes=2, per_class=30)
    bad = add_bad_files(tmp_path / "data")
    info = build(tmp_path / "data", tmp_path / "cache", max_pixels=100_000, max_bad=0.1)
    skipped = dict(read_manifest(info.path)["skipped"])
    assert {Path(p).name for p in skipped} == set(bad)
    for path, reason in skipped.items():
        assert bad[Path(path).name] in reason, (path, reason)
    assert sum(info.counts.values()) == 60 and summary(info)["skipped"] == 5


def test_too_many_bad_files_fail_in_one_line_and_leave_no_cache(tmp_path):
    make_folder(tmp_path / "data", classes=2, per_class=30)
    add_bad_files(tmp_path / "data")
    expected = r"of 65 files \(.+%\) cannot be used, more than --max-bad 0.01; the first: class-0/"
    with pytest.raises(DataError, match=expected) as err:
        build(tmp_path / "data", tmp_path / "cache", max_pixels=100_000)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*.h5")) and not list((tmp_path / "cache").glob("*.tmp-*"))


def test_duplicates_are_kept_once_and_test_copies_leave_training(tmp_path):
    make_split_folder(tmp_path / "data", {"train": 10, "test": 4})
    train, test = tmp_path / "data" / "train", tmp_path / "data" / "test"
    shutil.copy(train / "class-0" / "img-0000.png", train / "class-0" / "copy.png")
    shutil.copy(test / "class-1" / "img-1000.png", train / "class-1" / "leaked.png")
    info = build(tmp_path / "data", tmp_path / "cache", valid_size=3)
    manifest = read_manifest(info.path)
    assert manifest["duplicates"] == [["train/class-0/img-0000.png", "train/class-0/copy.png"]] or manifest[
        "duplicates"
    ] == [["train/class-0/copy.png", "train/class-0/img-0000.png"]]
    assert manifest["leaked"] == ["train/class-1/leaked.png"]
    assert summary(info)["leaked"] == 1 and summary(info)["duplicates"] == 1
    assert not digests(info.path, "train") & digests(info.path, "test")
    assert info.counts["train"] + info.counts["valid"] == 30


# -- versions, incremental builds, sticky splits --------------------------------------


def test_growing_folder_decodes_only_new_images_and_keeps_every_split(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_folder(data, classes=3, per_class=30)
    first = build(data, cache)
    assert summary(first)["decoded"] == 90
    make_folder(data, classes=3, per_class=3, start=30)  # 10% more
    second = build(data, cache)
    assert summary(second) | {} == summary(second) and summary(second)["decoded"] == 9
    assert summary(second)["reused"] == 90
    for split in ("train", "valid", "test"):
        assert digests(first.path, split) <= digests(second.path, split), split
    assert second.counts["test"] == 20  # the new images filled the test quota of the bigger folder
    with h5py.File(first.path, "r") as old, h5py.File(second.path, "r") as new:
        rows = {d: i for i, d in enumerate(new["test/digests"][:])}
        for i, d in enumerate(old["test/digests"][:]):
            assert np.array_equal(old["test/images"][i], new["test/images"][rows[d]])

    # Removing and changing files: gone from the cache, the changed one decoded again.
    victim = data / "class-0" / "img-0001.png"
    victim.unlink()
    changed = data / "class-1" / "img-0002.png"
    picture(1, 777, (40, 40)).save(changed)
    third = build(data, cache)
    assert summary(third)["decoded"] == 1 and sum(third.counts.values()) == 98
    with h5py.File(third.path, "r") as f:
        paths = {p.decode() for s in ("train", "valid", "test") for p in f[f"{s}/paths"][:]}
    assert "class-0/img-0001.png" not in paths and "class-1/img-0002.png" in paths

    # Unchanged: the same file, found after a stat walk that reads no file.
    monkeypatch.setattr(folder_module, "_digest", lambda path: pytest.fail(f"{path} was read again"))
    assert build(data, cache).path == third.path


def test_a_folder_that_only_grew_keeps_its_pictures_as_stored_chunks(tmp_path, monkeypatch):
    """Pictures only added: every kept picture's stored chunk is copied as it is, not read and written again.

    At ImageNet's size the rows a grown version keeps are 4.2 GB; through HDF5's selections and
    NumPy that was a third of the grown build (`benchmarks/README.md`, stop 45).
    """
    from tnflow.tasks.cache.h5cache import CHUNK_IMAGES, CacheWriter

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_folder(data, classes=2, per_class=60)
    first = build(data, cache, valid_size=0.1, test_size=0.1)
    make_folder(data, classes=2, per_class=6, start=60)
    raw_rows = []
    append_chunks = CacheWriter.append_chunks
    monkeypatch.setattr(
        CacheWriter,
        "append_chunks",
        lambda self, split, *a: raw_rows.append(len(a[1])) or append_chunks(self, split, *a),
    )
    second = build(data, cache, valid_size=0.1, test_size=0.1)
    assert summary(second)["decoded"] == 12 and summary(second)["reused"] == 120
    with h5py.File(first.path, "r") as old, h5py.File(second.path, "r") as new:
        for split in ("train", "valid", "test"):
            kept = old[f"{split}/labels"].shape[0]
            for name in ("images", "labels", "digests", "paths"):
                assert np.array_equal(new[f"{split}/{name}"][:kept], old[f"{split}/{name}"][:]), (split, name)
        whole = sum(
            old[f"{split}/labels"].shape[0] // CHUNK_IMAGES * CHUNK_IMAGES for split in ("train", "valid", "test")
        )
    assert whole >= 3 * CHUNK_IMAGES and sum(raw_rows) == whole, "every whole chunk kept is copied as stored"


def test_a_rescan_and_the_sticky_split_plan_are_one_pass_over_the_pictures(tmp_path):
    """A re-scan (a stat walk against the index) and the split plan (half the pictures placed before), pinned linear.

    At ImageNet's size both run on 1.28 million pictures for every watch and every build;
    `benchmarks/bench_scale.py` measures them there.
    """
    from tnflow.tasks.sources.folder_splits import plan_splits

    def folder(n: int) -> Path:
        root = tmp_path / f"folder-{n}"
        for i in range(n):
            path = root / f"class-{i % 10}" / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"picture {i}".encode())
        return root

    def rescan(n: int):
        root, index = folder(n), tmp_path / f"index-{n}.json"
        scan_folder(root, index)  # the first scan reads every file; the pinned one reads none
        return lambda: scan_folder(root, index)

    def plan(n: int):
        scan = scan_folder(tmp_path / f"folder-{n}")
        folder_spec = spec(scan.root)
        placed = list(plan_splits(scan, folder_spec).assignment.items())
        return lambda: plan_splits(scan, folder_spec, dict(placed[: n // 2]))

    assert_linear(rescan, 300)
    assert_linear(plan, 300)


@pytest.mark.slow  # decodes 1,500 pictures in two folders: 15 s
def test_a_build_after_one_percent_more_pictures_is_one_pass_over_the_folder(tmp_path):
    """Which rows the previous version lends is a lookup by content digest, not a search: pinned linear.

    The work counted is this process's (scan, plan, diff against the previous version, the
    copying of its rows, the manifest); decoding the new pictures happens in the pool's processes.
    """

    def grown(n: int):
        data, cache = tmp_path / f"data-{n}", tmp_path / f"cache-{n}"
        make_folder(data, classes=2, per_class=n // 2)
        build(data, cache)
        make_folder(data, classes=2, per_class=max(1, n // 200), start=n // 2)  # 1% more
        return lambda: build(data, cache)

    assert_linear(grown, 300)


def test_a_subset_build_does_not_unpin_the_splits(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_folder(data, classes=2, per_class=30)
    full = build(data, cache)
    build(data, cache, limit_train=10, limit_test=4)  # a smoke run in between
    make_folder(data, classes=2, per_class=4, start=30)
    grown = build(data, cache)
    assert digests(full.path, "test") <= digests(grown.path, "test")
    assert not digests(full.path, "test") & digests(grown.path, "train")


def test_splits_follow_content_not_position(tmp_path):
    make_folder(tmp_path / "a", classes=2, per_class=20)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for path in sorted((tmp_path / "b").rglob("*.png")):  # renamed and reordered
        path.rename(path.with_name("z-" + hashlib.md5(path.name.encode()).hexdigest() + ".png"))
    a, b = build(tmp_path / "a", tmp_path / "ca"), build(tmp_path / "b", tmp_path / "cb")
    for split in ("train", "valid", "test"):
        assert digests(a.path, split) == digests(b.path, split)


def test_concurrent_builds_of_one_version_build_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    make_folder(tmp_path / "data", classes=2, per_class=12)
    with ThreadPoolExecutor(2) as pool:
        infos = list(pool.map(lambda _: build(tmp_path / "data", tmp_path / "cache"), range(2)))
    assert infos[0] == infos[1] and len(list((tmp_path / "cache").glob("*.h5"))) == 1


# -- archives -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_of_a_folder_unpack_safely(tmp_path, kind, caplog):
    make_folder(tmp_path / "photos", classes=2, per_class=6)
    archive = tmp_path / f"photos.{kind}"
    hostile = {"../evil.png": b"x", "/tmp/abs-evil.png": b"x"}
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted((tmp_path / "photos").rglob("*.png")):
                zf.write(path, path.relative_to(tmp_path).as_posix())
            for name, data in hostile.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tmp_path / "photos", "photos")
            link = tarfile.TarInfo("photos/class-0/link.png")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
            for name, data in hostile.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    info = build_folder_cache(archive, spec(archive.parent, valid_size=2, test_size=2), cache, archive_md5=md5)
    assert info.counts == {"train": 8, "valid": 2, "test": 2}
    unsafe = read_manifest(info.path)["unpacked_skipped"]
    assert set(hostile) <= set(unsafe) and (kind == "zip" or "photos/class-0/link.png" in unsafe)
    assert f"{len(unsafe)} archive member(s) not unpacked from the archive" in caplog.text, "said, not only listed"
    assert {(m, UNSAFE_MEMBER) for m in unsafe} <= set(data_sections(info.path)["skipped"]), "and in the report"
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/abs-evil.png").exists()
    assert not list(cache.rglob("*evil*"))


# -- Dask ---------------------------------------------------------------------------------


def test_a_dask_cluster_builds_the_same_cache(tmp_path):
    distributed = pytest.importorskip("distributed", exc_type=ImportError)
    make_folder(tmp_path / "data", classes=3, per_class=12, fmt="jpg")
    local = build(tmp_path / "data", tmp_path / "local")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = build(tmp_path / "data", tmp_path / "remote", dask_address=cluster.scheduler_address)
    with h5py.File(local.path, "r") as a, h5py.File(remote.path, "r") as b:
        for split in ("train", "valid", "test"):
            for name in ("images", "labels", "digests"):
                assert np.array_equal(a[f"{split}/{name}"][:], b[f"{split}/{name}"][:]), (split, name)
    assert json.loads(json.dumps(local.counts)) == remote.counts


@pytest.mark.parametrize(
    ("rows", "read_as"),
    [([3, 4, 5, 6], slice), ([3, 5, 6, 8], slice), ([0, 9], list), ([7], slice)],
    ids=["a run", "gaps, a slice", "sparse, a list", "one"],
)
def test_kept_rows_are_read_as_a_list_would_read_them(tmp_path, rows, read_as):
    """The grown build reads the rows it keeps from the previous version as one slice where it can:
    HDF5 selects a list row by row."""
    from tnflow.tasks.cache.folder_rows import _read_rows

    class Recorded:
        def __init__(self, dataset):
            self.dataset, self.keys = dataset, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.dataset[key]

    pixels = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    with h5py.File(tmp_path / "rows.h5", "w") as f:
        images = Recorded(f.create_dataset("images", data=pixels, chunks=(4, 2, 2, 3)))
        assert np.array_equal(_read_rows(images, rows), pixels[rows])
    assert [type(key) for key in images.keys] == [read_as]


def test_dask_jobs_are_cut_by_count_and_by_bytes_in_order():
    """A Dask task carries its files' bytes: many small files share one, a large file goes alone."""
    from tnflow.tasks.cache.folder_rows import _jobs
    from tnflow.tasks.sources.folder import Entry

    sizes = [10, 10, 10, 10, 10, 95, 10, 10, 200, 10]
    entries = [Entry(f"c/{i}.jpg", 0, "", size, f"{i:064x}") for i, size in enumerate(sizes)]
    jobs = _jobs(entries, images=3, max_bytes=100)
    assert [[int(e.path[2:-4]) for e in job] for job in jobs] == [[0, 1, 2], [3, 4], [5], [6, 7], [8], [9]]
    assert _jobs([], images=3, max_bytes=100) == []


def test_an_unguarded_script_fails_fast_instead_of_hanging(tmp_path):
    """Spawned workers import the calling script again; without a main guard they must not build too."""
    import subprocess
    import sys

    make_folder(tmp_path / "data", classes=2, per_class=4)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from tnflow.tasks.cache.folder_cache import build_folder_cache\n"
        "from tnflow.tasks.config.options import DataConfig\n"
        f"config = DataConfig(data_dir={str(tmp_path / 'data')!r}, image_size=32, cache_dir={str(tmp_path / 'c')!r})\n"
        "build_folder_cache(config.data_dir, config.cache_spec(), config.cache_dir, workers=1)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "guard" in done.stderr.splitlines()[-1], done.stderr[-2000:]
    assert not list((tmp_path / "c").glob("*.h5"))


# -- names and state files that would once have stopped a build ---------------------------


def test_a_folder_whose_own_name_is_not_utf8_builds_and_is_shown_escaped(tmp_path):
    """Called from Python (the CLI and the flows refuse such a path: Prefect sends options as text), the folder is
    read where it is: its path (bytes of another encoding) is kept exactly and shown escaped."""
    root = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9")))
    make_folder(root, classes=2, per_class=10)
    info = build_folder_cache(root, spec(tmp_path), tmp_path / "cache", workers=2)
    assert Path(info.path).name.startswith("folder-caf_xe9-32px-") and sum(info.counts.values()) == 20
    assert read_manifest(info.path)["source"] == str(root), "exactly: the watch and the review find it again"
    assert ("source", f"{tmp_path}/caf\\xe9") in data_sections(info.path)["data"], "shown escaped in the report"
    assert build_folder_cache(root, spec(tmp_path), tmp_path / "cache", workers=2).path == info.path, "found again"


def test_a_file_name_that_is_not_utf8_is_skipped_with_its_reason(tmp_path):
    make_folder(tmp_path / "data", classes=2, per_class=20)
    odd = os.path.join(os.fsencode(tmp_path / "data" / "class-0"), b"bad\xff\xfename.png")
    with open(odd, "wb") as handle:
        picture(0, 500).save(handle, format="PNG")
    info = build(tmp_path / "data", tmp_path / "cache", max_bad=0.1)
    skipped = dict(read_manifest(info.path)["skipped"])
    assert skipped == {"class-0/bad\\xff\\xfename.png": "file name is not valid UTF-8; rename it"}
    assert sum(info.counts.values()) == 40


def test_a_linked_folder_is_counted_as_ignored_not_dropped(tmp_path):
    make_folder(tmp_path / "data", classes=2, per_class=20)
    make_folder(tmp_path / "elsewhere", classes=1, per_class=3)
    os.symlink(tmp_path / "elsewhere" / "class-0", tmp_path / "data" / "class-1" / "more")
    info = build(tmp_path / "data", tmp_path / "cache")
    assert "class-1/more/ (a linked folder, not followed)" in read_manifest(info.path)["ignored"]
    assert summary(info)["ignored"] == 1 and sum(info.counts.values()) == 40


def test_too_many_bad_files_found_early_say_at_least(tmp_path):
    make_folder(tmp_path / "data", classes=2, per_class=30)
    add_bad_files(tmp_path / "data")
    with pytest.raises(DataError, match=r"^at least \d \(the build stopped there\) of 65 files"):
        build(tmp_path / "data", tmp_path / "cache", max_pixels=100_000)


@pytest.mark.parametrize("damaged", ["manifest", "both", "before stop 43"])
def test_a_damaged_manifest_is_rebuilt_and_the_splits_stay(tmp_path, caplog, damaged):
    """The splits live in their own dataset; damaged too, they are rebuilt from the pictures' digests.

    "before stop 43": a cache whose manifest still holds the splits (no dataset of their own).
    """
    make_folder(tmp_path / "data", classes=2, per_class=20)
    first = build(tmp_path / "data", tmp_path / "cache")
    assert "splits" not in read_manifest(first.path), "the big table is not in what every reader parses"
    with h5py.File(first.path, "r+") as f:
        splits = f["split_assignment"][()]
        manifest = f["manifest"][()]
        del f["manifest"]
        if damaged == "before stop 43":
            del f["split_assignment"]
            f["manifest"] = json.dumps({**json.loads(manifest), "splits": json.loads(splits)})
        else:
            f["manifest"] = '{"version": "trunc'
        if damaged == "both":
            del f["split_assignment"]
            f["split_assignment"] = '{"0a1b": "tra'
    assert len(read_split_assignment(first.path)) == 40 and set(read_split_assignment(first.path).values()) <= {
        "train",
        "valid",
        "test",
    }
    make_folder(tmp_path / "data", classes=2, per_class=5, start=20)  # five new pictures per class
    second = build(tmp_path / "data", tmp_path / "cache")
    said = caplog.text
    assert ("the manifest of" in said) == (damaged != "before stop 43")
    assert ("the split assignment of" in said and "is damaged: rebuilt from its pictures' digests" in said) == (
        damaged == "both"
    )
    for split in ("train", "valid", "test"):
        assert digests(first.path, split) <= digests(second.path, split), f"{split} kept its pictures"


def test_a_damaged_stat_index_is_rebuilt_and_says_so(tmp_path, caplog):
    make_folder(tmp_path / "data", classes=2, per_class=20)
    first = build(tmp_path / "data", tmp_path / "cache")
    (index,) = (tmp_path / "cache").rglob("stat-index.json")
    index.write_text('{"class-0/img-0000.png": [12')
    second = build(tmp_path / "data", tmp_path / "cache")
    assert f"the stat index {index} is damaged" in caplog.text
    assert second.path == first.path and json.loads(index.read_text()), "the same version, a sound index again"


def test_test_pictures_leave_the_training_content_alone(tmp_path):
    """Training is keyed by its content: new test pictures make a new cache, not a new training."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_split_folder(data, {"train": 12, "test": 4})
    first = build(data, cache, valid_size=0.25)
    make_folder(data / "test", classes=3, per_class=2, start=5000)  # more test pictures
    picture(0, 4242).save(data / "test" / "class-0" / "img-1000.png")  # and a changed one
    second = build(data, cache, valid_size=0.25)
    assert second.path != first.path and second.counts["test"] == first.counts["test"] + 6
    assert training_content(second.path) == training_content(first.path)
    make_folder(data / "train", classes=3, per_class=1, start=9000)  # a training picture
    third = build(data, cache, valid_size=0.25)
    assert training_content(third.path) != training_content(second.path)
    assert training_content(build(data, cache, valid_size=0.25, image_size=40).path) != training_content(third.path)
