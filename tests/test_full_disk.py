"""A disk that fills up while tnflow writes: one line naming the path and the stage, no crash, nothing half-done.

The builds run in a child process: a full disk once made HDF5 crash the process at exit (exit
139, below dozens of `errno = 28` lines), which only a separate process can show. Each test
uses a real small file system (a tmpfs mount) where the machine allows one, else an ENOSPC
injected at the write call.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import make_archive
from tests.folders import make_folder
from tnflow.tasks.core.errors import DiskFullError, TransientDownloadError
from tnflow.tasks.sources.download import fetch, target_path

BUILD = """
import errno, sys
from pathlib import Path
import tnflow.tasks.cache.folder_rows as rows
import tnflow.tasks.cache.stage as stage
from tnflow.tasks.cache import h5cache
from tnflow.tasks.core.errors import DiskFullError, TransientDownloadError

kind, source, md5, cache_dir, inject = sys.argv[1:6]
# The disk fills while the build writes (another writer beside it), after the check of free space.
rows.check_free_space = stage.check_free_space = lambda *args, **kwargs: None
if inject == "yes":  # no mount on this machine: ENOSPC at the write call
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_chunks(*args, **kwargs):  # a generator, as resized_chunks: it fails when the writer asks for pixels
        yield full()

    h5cache.CacheWriter.append = full
    stage.resized_chunks = full_chunks
try:
    if kind == "folder":
        from tnflow.tasks.cache.folder_cache import build_folder_cache
        from tnflow.tasks.config.options import DataConfig

        config = DataConfig.from_values({"data_dir": source, "image_size": 32, "valid_size": 0.2, "test_size": 0.2})
        build_folder_cache(source, config.cache_spec(), cache_dir, workers=1)
    else:
        from tnflow.tasks.config.specs import CacheSpec

        stage.build_cache(Path(source), md5, CacheSpec("cifar10", 32, 40, None, None, 0), cache_dir, workers=1)
except DiskFullError as exc:
    print(f"one line: {exc}")
"""


@pytest.mark.parametrize("how", ["small-disk", "injected"])
@pytest.mark.parametrize("kind", ["folder", "cifar"])
def test_a_full_disk_during_the_cache_build_is_one_line_and_leaves_no_cache(kind, how, small_disk, tmp_path):
    if kind == "folder":
        source, md5 = tmp_path / "pictures", ""
        make_folder(source, classes=3, per_class=40)  # 120 pictures: 370 KB of pixels at 32 px
    else:
        source = tmp_path / "c10.tar.gz"
        _, md5 = make_archive(source, n_train=160, n_test=40)
    disk = small_disk(160) if how == "small-disk" else None
    cache_dir = disk or tmp_path / "cache"
    command = [sys.executable, "-c", BUILD, kind, str(source), md5, str(cache_dir), "no" if disk else "yes"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert "errno = 28" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith(f"one line: no space left on {cache_dir}/") and ".h5 while building the cache" in line
    assert "free space and run again" in line
    left = [path.name for path in cache_dir.iterdir() if path.suffix != ".lock" and path.name != "folders"]
    assert left == [] or left == ["downloads"], f"nothing that looks finished, no temporary: {left}"


BODY = os.urandom(3 << 20)  # a 3 MB download, larger than the small disk
MD5 = hashlib.md5(BODY, usedforsecurity=False).hexdigest()


@pytest.mark.parametrize("how", ["small-disk", "injected"])
def test_a_full_disk_during_a_download_keeps_its_first_error_and_removes_the_partial_file(
    how, file_server, small_disk, tmp_path, monkeypatch
):
    """Never retried (a retry cannot free space), the first error kept, no partial file left to fill the disk."""
    file_server.files["data.tar.gz"] = BODY
    url = file_server.url("data.tar.gz")
    disk = small_disk(1024) if how == "small-disk" else None
    if disk is None:  # ENOSPC at the write call, and again at the close that flushes what is buffered
        import tnflow.tasks.sources.download as download

        class FullDisk:
            def __init__(self, handle):
                self.handle = handle

            def write(self, block):
                self.handle.write(block[:1000])
                raise OSError(errno.ENOSPC, "No space left on device")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(download, "open", lambda path, mode: FullDisk(open(path, mode)), raising=False)  # noqa: SIM115
    dest = disk or tmp_path / "dest"
    with pytest.raises(DiskFullError) as raised:
        fetch(url, dest, MD5)
    assert not isinstance(raised.value, TransientDownloadError), "retrying cannot free the disk"
    part = target_path(url, dest, MD5).with_name("data.tar.gz.part")
    assert str(raised.value) == (
        f"no space left on {part} while downloading {url} (the partial file was removed); "
        "free space and run again (finished work is kept)"
    )
    assert not part.exists() and not target_path(url, dest, MD5).exists()
    monkeypatch.undo()
    assert Path(fetch(url, tmp_path / "roomy", MD5).path).read_bytes() == BODY, "with room, the same call completes"


def test_a_one_line_error_raised_from_none_pickles_without_the_error_it_replaced():
    """Prefect stores a failed state's exception; with tblib installed (Dask and TensorFlow install it) a pickle
    carries the exception's chain, and a TensorFlow error in it (its graph operation) cannot be pickled: Prefect
    then warned "Failed to write result" beside the one line."""
    import pickle

    from tblib import pickling_support

    class Operation:
        def __reduce__(self):
            raise TypeError("cannot pickle 'Operation' object")

    class TensorFlowError(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.op = Operation()

    pickling_support.install()
    try:
        try:
            raise TensorFlowError("No space left on device")
        except TensorFlowError:
            raise DiskFullError("no space left on /x while saving training checkpoints") from None
    except DiskFullError as raised:
        error = raised
    assert error.__suppress_context__ and error.__context__ is None
    assert str(pickle.loads(pickle.dumps(error))) == "no space left on /x while saving training checkpoints"
    try:
        try:
            raise ValueError("the cause")
        except ValueError:
            raise DiskFullError("raised inside the handler, without from None")  # noqa: B904 - on purpose
    except DiskFullError as raised:
        assert repr(raised.__context__) == "ValueError('the cause')", "a context not suppressed stays"
