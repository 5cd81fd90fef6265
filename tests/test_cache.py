import errno
import gzip
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import tnflow.tasks.cache.stage as cache
from tests.fakes import cifar_members, make_archive, make_cifar, write_archive
from tnflow.tasks.cache import h5cache
from tnflow.tasks.config.specs import CacheSpec
from tnflow.tasks.core.errors import DataError, DiskFullError, TnflowError
from tnflow.tasks.sources import cifar, resize
from tnflow.tasks.sources import splits as splitting

REPO = Path(__file__).resolve().parents[1]


def spec(**changes) -> CacheSpec:
    values = dict(dataset="cifar10", image_size=32, valid_size=100, limit_train=None, limit_test=None, seed=0)
    values.update(changes)
    return CacheSpec(**values)


# -- reading archives -------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_reads_both_archive_formats_exactly(tmp_path, dataset):
    fake, _ = make_archive(tmp_path / "a.tar.gz", dataset, n_train=400, n_test=200)
    got = cifar.read_archive(tmp_path / "a.tar.gz", dataset)
    np.testing.assert_array_equal(got.train_images, fake.train_images)
    np.testing.assert_array_equal(got.train_labels, fake.train_labels)
    np.testing.assert_array_equal(got.test_images, fake.test_images)
    np.testing.assert_array_equal(got.test_labels, fake.test_labels)
    assert got.class_names == fake.class_names


def _broken(tmp_path, change) -> Path:
    members = cifar_members(make_cifar("cifar10", n_train=100, n_test=20))
    change(members)
    path = tmp_path / "broken.tar.gz"
    write_archive(path, members)
    return path


def _labels_out_of_range(members):
    batch = pickle.loads(members["cifar-10-batches-py/data_batch_2"], encoding="bytes")
    batch[b"labels"][3] = 10
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps(batch, protocol=2)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BROKEN = {
    "missing-member": (lambda m: m.pop("cifar-10-batches-py/data_batch_3"), "lacks cifar-10-batches-py/data_batch_3"),
    "corrupt-pickle": (
        lambda m: m.update({"cifar-10-batches-py/test_batch": b"\x80\x02}q\x00(garbage"}),
        "not a valid CIFAR pickle",
    ),
    "code-in-pickle": (
        lambda m: m.update({"cifar-10-batches-py/test_batch": pickle.dumps(_Evil())}),
        "refusing to load",
    ),
    "labels-out-of-range": (_labels_out_of_range, "label 10 is outside 0..9"),
    "wrong-class-count": (
        lambda m: m.update({"cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": [b"a", b"b"]})}),
        "does not list 10 class names",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_archives_are_clear_errors(tmp_path, case):
    change, message = BROKEN[case]
    with pytest.raises(DataError, match=message) as raised:
        cifar.read_archive(_broken(tmp_path, change), "cifar10")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "content", [b"plain text, not gzip", gzip.compress(b"gzip, but not a tar")], ids=["not-gzip", "not-tar"]
)
def test_files_that_are_not_gzip_tars(tmp_path, content):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a readable gzip tar"):
        cifar.read_archive(path, "cifar10")


def test_cifar100_archive_given_as_cifar10(tmp_path):
    make_archive(tmp_path / "c100.tar.gz", "cifar100", n_train=200, n_test=100)
    with pytest.raises(DataError, match="check --dataset"):
        cifar.read_archive(tmp_path / "c100.tar.gz", "cifar10")


# -- splits -----------------------------------------------------------------------------


def test_stratified_subset_keeps_class_shares():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    picked = splitting.stratified_subset(labels, 100, np.random.default_rng(0))
    assert len(picked) == len(set(picked)) == 100
    assert Counter(labels[picked].tolist()) == {0: 10, 1: 20, 2: 30, 3: 40}
    assert np.all(np.diff(picked) > 0)


def test_splits_are_seeded_disjoint_and_stratified(tmp_path):
    fake, _ = make_archive(tmp_path / "a.tar.gz", n_train=1000, n_test=100)
    data = cifar.read_archive(tmp_path / "a.tar.gz", "cifar10")
    splits = splitting.split_indices(data, spec(valid_size=200, limit_train=500, limit_test=50))
    again = splitting.split_indices(data, spec(valid_size=200, limit_train=500, limit_test=50))
    other = splitting.split_indices(data, spec(valid_size=200, limit_train=500, limit_test=50, seed=1))
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["valid"], other["valid"])
    assert not set(splits["train"]) & set(splits["valid"])
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == (500, 200, 50)
    assert set(Counter(fake.train_labels[splits["valid"]]).values()) == {20}
    assert set(Counter(fake.test_labels[splits["test"]]).values()) == {5}
    assert np.all(np.diff(splits["test"]) > 0), "test keeps the official order"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"valid_size": 500}, "--valid-size 500 leaves no training images"),
        ({"limit_train": 450}, "--limit-train 450 exceeds"),
        ({"limit_test": 101}, "--limit-test 101 exceeds"),
    ],
)
def test_impossible_sizes(cifar10, changes, message):
    _, path, _ = cifar10
    data = cifar.read_archive(path, "cifar10")
    with pytest.raises(DataError, match=message):
        splitting.split_indices(data, spec(**changes))


# -- resizing ---------------------------------------------------------------------------


def reference_resize(image: np.ndarray, size: int) -> np.ndarray:
    """scikit-image's bilinear resize, as the recipe but without darkened borders."""
    from skimage.transform import resize as skimage_resize

    out = skimage_resize(image, (size, size), order=1, mode="edge", anti_aliasing=False, preserve_range=True)
    return np.rint(out).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 33, 64, 100, 224])
def test_fast_resize_agrees_with_scikit_image(size):
    images = np.random.default_rng(size).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fast = resize.resize_batch(images, size)
    reference = np.stack([reference_resize(image, size) for image in images])
    assert fast.shape == (6, size, size, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - reference).max() <= 1


def test_borders_are_not_darkened():
    flat = np.full((1, 32, 32, 3), 200, dtype=np.uint8)
    assert np.all(resize.resize_batch(flat, 224) == 200)
    # Zero padding outside the image (old scikit-image's mode='constant') fails that check:
    from scipy.ndimage import zoom

    padded = zoom(flat[0].astype(float), (7, 7, 1), order=1, mode="grid-constant", grid_mode=True)
    assert padded[0, 0, 0] < 199


# -- building the cache file ------------------------------------------------------------


def test_cache_content_is_exact_at_size_32(cifar10, tmp_path):
    fake, path, md5 = cifar10
    info = cache.build_cache(path, md5, spec(), tmp_path / "cache")
    assert info.counts == {"train": 400, "valid": 100, "test": 100}
    assert info.class_names == tuple(fake.class_names)
    splits = splitting.split_indices(cifar.read_archive(path, "cifar10"), spec())
    with h5py.File(info.path, "r") as f:
        assert f.attrs["source_md5"] == md5 and f.attrs["image_size"] == 32
        assert list(f.attrs["class_names"]) == fake.class_names
        assert "edge" in f.attrs["resize_method"] and f.attrs["format_version"] == h5cache.FORMAT_VERSION
        for split, images, labels in [
            ("train", fake.train_images, fake.train_labels),
            ("valid", fake.train_images, fake.train_labels),
            ("test", fake.test_images, fake.test_labels),
        ]:
            np.testing.assert_array_equal(f[f"{split}/images"][:], images[splits[split]])
            np.testing.assert_array_equal(f[f"{split}/labels"][:], labels[splits[split]])
            assert f[f"{split}/images"].dtype == np.uint8 and f[f"{split}/labels"].dtype == np.int64
        assert f["train/images"].chunks[0] == h5cache.CHUNK_IMAGES


def test_cache_at_larger_size_matches_the_reference(cifar10, tmp_path):
    _, path, md5 = cifar10
    small = spec(image_size=72, limit_train=40, limit_test=10, valid_size=20)
    info = cache.build_cache(path, md5, small, tmp_path)
    data = cifar.read_archive(path, "cifar10")
    picked = splitting.split_indices(data, small)["test"]
    reference = np.stack([reference_resize(data.test_images[i], 72) for i in picked])
    with h5py.File(info.path, "r") as f:
        assert np.abs(f["test/images"][:].astype(int) - reference).max() <= 1


def test_a_second_build_reuses_the_file(cifar10, tmp_path, monkeypatch):
    _, path, md5 = cifar10
    first = cache.build_cache(path, md5, spec(), tmp_path)
    monkeypatch.setattr(cache, "read_archive", lambda *a: pytest.fail("rebuilt a complete cache"))
    assert cache.build_cache(path, md5, spec(), tmp_path) == first


def test_a_truncated_cache_is_rebuilt(cifar10, tmp_path):
    _, path, md5 = cifar10
    info = cache.build_cache(path, md5, spec(), tmp_path)
    data = Path(info.path).read_bytes()
    Path(info.path).write_bytes(data[: len(data) // 2])
    assert h5cache.inspect_cache(info.path) is None
    assert cache.build_cache(path, md5, spec(), tmp_path) == info


def test_concurrent_builds_share_one_build(cifar10, tmp_path, monkeypatch):
    _, path, md5 = cifar10
    reads = []
    real = cifar.read_archive
    monkeypatch.setattr(cache, "read_archive", lambda *a: reads.append(1) or real(*a))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.build_cache(path, md5, spec(), tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and all(r == results[0] for r in results) and len(reads) == 1


def test_not_enough_disk_space_fails_before_work(cifar10, tmp_path, monkeypatch):
    _, path, md5 = cifar10
    monkeypatch.setattr("tnflow.tasks.core.files.shutil.disk_usage", lambda directory: SimpleNamespace(free=1000))
    with pytest.raises(TnflowError, match=r"has 0.0 GB free but this needs .* free some space"):
        cache.build_cache(path, md5, spec(), tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir()), "no file, not even a lock"


def test_disk_full_mid_write_keeps_the_earlier_cache(cifar10, tmp_path, monkeypatch):
    _, path, md5 = cifar10
    earlier = cache.build_cache(path, md5, spec(), tmp_path)
    before = Path(earlier.path).read_bytes()
    writes = []

    def full_disk(self, key, value):
        writes.append(1)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    real_setitem = h5py.Dataset.__setitem__
    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_disk)
    with pytest.raises(DiskFullError, match=r"no space left on .* while building the cache; free space") as raised:
        cache.build_cache(path, md5, spec(image_size=48), tmp_path)
    assert "\n" not in str(raised.value)
    assert Path(earlier.path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []
    assert not cache.cache_path(tmp_path, spec(image_size=48), md5).exists()


def test_cache_dir_that_is_not_writable(cifar10, tmp_path):
    _, path, md5 = cifar10
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TnflowError, match=r"--cache-dir .* is not a writable directory"):
        cache.build_cache(path, md5, spec(), blocker / "cache")


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_that_looks_finished(tmp_path):
    archive = tmp_path / "big.tar.gz"
    _, md5 = make_archive(archive, n_train=3000, n_test=500)
    target = cache.cache_path(tmp_path / "cache", spec(image_size=160, valid_size=500), md5)
    script = (
        "import sys; from tnflow.tasks.cache.stage import build_cache; from tnflow.tasks.config.specs import CacheSpec;"
        "build_cache(sys.argv[1], sys.argv[2], CacheSpec('cifar10', 160, 500, None, None, 0), sys.argv[3])"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(archive), md5, str(tmp_path / "cache")], cwd=REPO)
    deadline = time.monotonic() + 60
    while not list(target.parent.glob(target.name + ".tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(target.parent.glob(target.name + ".tmp-*")), "the build should have been caught mid-write"
    assert not target.exists() and h5cache.inspect_cache(target) is None

    info = cache.build_cache(archive, md5, spec(image_size=160, valid_size=500), tmp_path / "cache")
    assert info.counts == {"train": 2500, "valid": 500, "test": 500}
    assert not list(target.parent.glob(target.name + ".tmp-*")), "the next build clears what the killed one left"


def test_the_cifar_cache_is_what_it_was(tmp_path):
    """Folders must not change CIFAR's result: the same content as main at 4eea8b5, before folders.

    Everything but the pixels is pinned by a digest (every attribute, every dataset's dtype,
    shape and chunking, the labels' bytes), computed from a file that commit's code built.
    The pixels are pinned by their contract instead: each is within one grey level of
    scikit-image's bilinear resize of the source picture the split says. Their exact bytes are
    not a contract: the resize's float32 sums come from the BLAS kernel the processor selects,
    and a value on a .5 tie rounds either way (OPENBLAS_CORETYPE=Prescott turned 4eea8b5's
    byte digest red on the very machine that had recorded it).
    """
    make_archive(tmp_path / "a.tar.gz", n_train=300, n_test=60)
    # A fixed recorded md5: the archive's own changes with gzip's timestamp, its content does not.
    info = cache.build_cache(tmp_path / "a.tar.gz", "5" * 32, spec(image_size=40, valid_size=50), tmp_path / "c")
    assert content_digest(info.path) == "d4f758bd28785e4b4bc75858c07e05186ea722a317fabd4e07d3608d76ba0096"
    data = cifar.read_archive(tmp_path / "a.tar.gz", "cifar10")
    splits = splitting.split_indices(data, spec(image_size=40, valid_size=50))
    sources = {"train": data.train_images, "valid": data.train_images, "test": data.test_images}
    with h5py.File(info.path, "r") as f:
        for split, index in splits.items():
            reference = np.stack([reference_resize(image, 40) for image in sources[split][index]])
            assert np.abs(f[f"{split}/images"][:].astype(int) - reference).max() <= 1, split


def content_digest(path) -> str:
    """Attributes, and every dataset's dtype, shape and chunking; bytes of all but the images.

    Not `training_content`, an attribute added since: a key for training, checked on its own.
    """
    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for name in sorted(set(f.attrs) - {h5cache.TRAINING_CONTENT}):
            digest.update(f"{name}={np.asarray(f.attrs[name]).tolist()!r}".encode())

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                digest.update(f"{name}:{obj.dtype}:{obj.shape}:{obj.chunks}".encode())
                if not name.endswith("images"):
                    digest.update(obj[()].tobytes())

        f.visititems(visit)
    return digest.hexdigest()


def test_limit_test_leaves_the_training_content_alone(cifar10, tmp_path):
    _, path, md5 = cifar10
    whole = cache.build_cache(path, md5, spec(), tmp_path)
    fewer_tests = cache.build_cache(path, md5, spec(limit_test=50), tmp_path)
    assert fewer_tests.path != whole.path
    assert h5cache.training_content(fewer_tests.path) == h5cache.training_content(whole.path)
    fewer_trains = cache.build_cache(path, md5, spec(limit_train=200), tmp_path)
    assert h5cache.training_content(fewer_trains.path) != h5cache.training_content(whole.path)
    other_seed = cache.build_cache(path, md5, spec(seed=1), tmp_path)
    assert h5cache.training_content(other_seed.path) != h5cache.training_content(whole.path)
