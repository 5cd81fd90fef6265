"""The cache reader: the right pixels from a memory map, every image once per epoch, reproducible orders."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.complexity import FACTOR, SLACK, assert_linear, peak_bytes
from tests.readers import iter_batches
from tnflow.tasks.cache.cache_reader import ALIGNMENT, CacheFeed, SplitReader, fold_of, fold_rows
from tnflow.tasks.cache.h5cache import inspect_cache, write_cache
from tnflow.tasks.config.specs import fold_split, parse_split
from tnflow.tasks.core.errors import TnflowError

COUNT, SIZE = 70, 8  # three chunks of 32 images, the last one partial


def numbered(count: int, first: int = 0) -> np.ndarray:
    """Images whose pixels say which image they are (and differ within an image)."""
    index = np.arange(first, first + count)[:, None, None, None]
    return ((index * 7 + np.arange(SIZE * SIZE * 3).reshape(1, SIZE, SIZE, 3)) % 251).astype(np.uint8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reader") / "cache.h5"
    images = numbered(COUNT)

    def chunks(start, n, step=24):  # written in pieces that do not line up with the chunks
        for offset in range(0, n, step):
            yield offset, images[start + offset : start + min(offset + step, n)]

    labels = np.arange(COUNT) % 10
    splits = {
        "train": (labels, chunks(0, COUNT)),
        "valid": (labels[:20], chunks(0, 20)),
        "test": (labels[:5], chunks(0, 5)),
    }
    write_cache(path, {"dataset": "t", "class_names": [str(i) for i in range(10)]}, splits, SIZE)
    return path


def test_batches_hold_the_images_and_labels_of_the_file(cache):
    with h5py.File(cache) as f:
        stored, labels = f["train/images"][:], f["train/labels"][:]
    reader = SplitReader(cache, "train")
    order = np.array([69, 0, 31, 32, 64, 5])
    images, got_labels = reader.read(order)
    np.testing.assert_array_equal(images, stored[order])
    np.testing.assert_array_equal(got_labels, labels[order])
    assert images.ctypes.data % ALIGNMENT == 0, "aligned, so TensorFlow takes it without a copy"


def test_unshuffled_batches_are_the_file_in_order(cache):
    batches = list(iter_batches(cache, "train", 32))
    assert [len(labels) for _, labels in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([images for images, _ in batches]), numbered(COUNT))


def test_a_shuffled_epoch_sees_every_image_once_in_an_order_of_its_own(cache):
    def seen(epoch, seed=0):
        return np.concatenate(
            [images[:, 0, 0, 0] for images, _ in iter_batches(cache, "train", 16, shuffle=True, seed=seed, epoch=epoch)]
        )

    first, again, second, other_seed = seen(1), seen(1), seen(2), seen(1, seed=1)
    ids = numbered(COUNT)[:, 0, 0, 0]
    assert sorted(first.tolist()) == sorted(ids.tolist()), "every image exactly once"
    np.testing.assert_array_equal(first, again)  # a resumed epoch replays the same order
    assert not np.array_equal(first, second) and not np.array_equal(first, other_seed)
    assert not np.array_equal(first, ids), "shuffled"
    # Images, not chunks, are shuffled: the first batch mixes images from every chunk.
    positions = [int(np.flatnonzero(ids == pixel)[0]) for pixel in first[:16]]
    assert {p // 32 for p in positions} == {0, 1, 2}


def test_a_feed_resizes_to_the_model_size(cache):
    images, _ = CacheFeed(cache, image_size=16).batch("valid", 0, False, 8, 0)
    assert images.shape == (8, 16, 16, 3)


def test_a_cache_not_stored_as_plain_chunks_is_not_a_cache(cache, tmp_path):
    compressed = tmp_path / "compressed.h5"
    with h5py.File(cache) as source, h5py.File(compressed, "w") as f:
        for name, value in source.attrs.items():
            f.attrs[name] = value
        for split in ("train", "valid", "test"):
            images = source[f"{split}/images"]
            f.create_dataset(f"{split}/images", data=images[:], chunks=images.chunks, compression="gzip")
            f.create_dataset(f"{split}/labels", data=source[f"{split}/labels"][:])
    assert inspect_cache(cache) is not None and inspect_cache(compressed) is None, "so the cache stage rebuilds it"
    with pytest.raises(TnflowError, match=r"not plain uncompressed chunks.*tnflow prepare"):
        SplitReader(compressed, "train")


def test_the_graph_reads_the_feeds_batches_in_order_with_several_threads(cache):
    import tensorflow as tf

    from tnflow.tasks.tf.inputs import READ_THREADS, input_pipeline

    assert READ_THREADS > 1, "otherwise order is trivially kept"
    graph = tf.Graph()
    with graph.as_default():
        args, init, images, labels = input_pipeline(CacheFeed(cache, seed=3), SIZE, None)
    with tf.compat.v1.Session(graph=graph) as session:
        for epoch in (1, 2):
            session.run(init, dict(zip(args, ("train", epoch, True, 16), strict=True)))
            got = []
            while True:
                try:
                    got.append(session.run([images, labels]))
                except tf.errors.OutOfRangeError:
                    break
            expected = list(iter_batches(cache, "train", 16, shuffle=True, seed=3, epoch=epoch))
            assert len(got) == len(expected) == 5
            for (got_images, got_labels), (images_, labels_) in zip(got, expected, strict=True):
                np.testing.assert_array_equal(got_images, images_)
                np.testing.assert_array_equal(got_labels, labels_)


def test_the_folds_of_a_split_are_stratified_disjoint_and_cover_it(cache):
    labels = np.repeat(np.arange(3), [50, 31, 9])  # unequal classes
    folds = fold_of(labels, 4)
    assert sorted(np.bincount(folds).tolist()) == [22, 22, 23, 23], "fold sizes differ by one at most"
    for c in range(3):  # each class spread over the folds in proportion
        per_fold = np.bincount(folds[labels == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    np.testing.assert_array_equal(folds, fold_of(labels.copy(), 4))  # a function of the labels: resumable
    assert not np.array_equal(fold_of(labels, 4)[:50], np.arange(50) % 4), "shuffled within a class"
    for fold in range(4):
        inside = fold_rows(labels, fold, 4, held_out=True)
        outside = fold_rows(labels, fold, 4, held_out=False)
        assert sorted([*inside, *outside]) == list(range(90)) and not set(inside) & set(outside)

    # A fold's name reads those rows, in the split's order; the cache file is not changed.
    with h5py.File(cache) as f:
        stored, stored_labels = f["train/images"][:], f["train/labels"][:]
    name = fold_split("train", 1, 3, held_out=True)
    assert parse_split(name) == ("train", (1, 3, True)) and parse_split("train") == ("train", None)
    rows = fold_rows(stored_labels, 1, 3, held_out=True)
    reader = SplitReader(cache, name)
    assert len(reader) == len(rows) and 0 < len(rows) < COUNT
    images, got = reader.read(np.arange(len(rows)))
    np.testing.assert_array_equal(images, stored[rows])
    np.testing.assert_array_equal(got, stored_labels[rows])
    rest = SplitReader(cache, fold_split("train", 1, 3, held_out=False))
    assert len(rest) + len(reader) == COUNT
    with pytest.raises(ValueError):
        fold_split("train", 3, 3, held_out=True)


def test_folds_of_many_pictures_take_linear_work_and_memory():
    """Counted, not timed (a wall-clock ratio failed at 34x under the suite's load): no loop over
    pictures or pairs in Python (`work`), and no array of pictures x pictures (`peak_bytes`)."""

    def folds(n):
        labels = np.arange(n) % 10
        return lambda: fold_of(labels, 5)

    assert assert_linear(folds, 20_000) <= FACTOR * SLACK
    assert assert_linear(folds, 20_000, peak_bytes) <= FACTOR * SLACK


def test_each_image_is_found_at_its_byte_offset_and_a_chunk_never_written_means_no_offsets(tmp_path):
    from tnflow.tasks.cache.h5cache import image_offsets

    path = tmp_path / "images.h5"
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (10, 4, 4, 3), np.uint8, chunks=(4, 4, 4, 3))
        images[0:4], images[8:10] = 1, 2  # rows 4-7, the second chunk, never written
        assert image_offsets(images) is None
        images[4:8] = np.arange(4 * 48, dtype=np.uint8).reshape(4, 4, 4, 3)
        offsets = image_offsets(images)
        expected = images[:]
    raw = path.read_bytes()
    assert [raw[o : o + 48] for o in offsets] == [row.tobytes() for row in expected]
