"""The prepare_data flow under a real (temporary) Prefect server: caching, rebuilds, retries."""

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

import tnflow.flows.prepare as prepare_flow
import tnflow.tasks.sources.download as download
from tests.folders import make_folder
from tests.prefect_runs import task_states
from tnflow.tasks.cache.h5cache import inspect_cache
from tnflow.tasks.core.errors import DownloadError


@pytest.fixture
def no_retry_delay(monkeypatch):
    """Keep the retries, drop the backoff, so retry tests take milliseconds."""
    monkeypatch.setattr(prepare_flow, "source_task", download.source_task.with_options(retry_delay_seconds=0))


def run(url, md5, cache_dir, **options):
    params = dict(data_url=url, data_md5=md5, image_size=32, valid_size=100, cache_dir=str(cache_dir))
    params.update(options)
    return prepare_flow.prepare_data(**params, return_state=True)


def test_rerun_is_cached_and_deleted_outputs_are_rebuilt(prefect_api, file_server, cifar10, tmp_path):
    _, archive, md5 = cifar10
    file_server.files["c10.tar.gz"] = archive.read_bytes()
    url = file_server.url("c10.tar.gz")

    first = run(url, md5, tmp_path)
    path = first.result()
    assert first.is_completed() and Path(path).is_absolute()
    assert inspect_cache(path).counts == {"train": 400, "valid": 100, "test": 100}
    assert task_states(first) == {"download": "Completed", "build-cache": "Completed"}

    second = run(url, md5, tmp_path)
    assert second.result() == path
    assert task_states(second) == {"download": "Cached", "build-cache": "Cached"}
    assert len(file_server.requests) == 1

    Path(path).unlink()
    third = run(url, md5, tmp_path)
    assert task_states(third) == {"download": "Cached", "build-cache": "Completed"}
    assert inspect_cache(third.result()) is not None, "a cached record must not return a deleted file"

    Path(download.target_path(url, tmp_path, md5)).unlink()
    fourth = run(url, md5, tmp_path)
    assert task_states(fourth) == {"download": "Completed", "build-cache": "Cached"}
    assert len(file_server.requests) == 2
    assert task_states(run(url, md5, tmp_path)) == {"download": "Cached", "build-cache": "Cached"}


def test_a_damaged_cached_download_is_fetched_again(prefect_api, file_server, cifar10, tmp_path):
    _, archive, md5 = cifar10
    file_server.files["c10.tar.gz"] = archive.read_bytes()
    url = file_server.url("c10.tar.gz")
    first = run(url, md5, tmp_path)
    copy = Path(download.target_path(url, tmp_path, md5))
    damaged = bytearray(copy.read_bytes())
    damaged[1000] ^= 0xFF  # same size, one byte flipped: only the digest sees it
    copy.write_bytes(bytes(damaged))

    second = run(url, md5, tmp_path)
    assert task_states(second) == {"download": "Completed", "build-cache": "Cached"}
    assert copy.read_bytes() == archive.read_bytes() and len(file_server.requests) == 2
    assert second.result() == first.result()


def test_transient_failures_are_retried_and_resumed(prefect_api, file_server, cifar10, tmp_path, no_retry_delay):
    _, archive, md5 = cifar10
    file_server.files["c10.tar.gz"] = archive.read_bytes()
    file_server.faults.extend(["500", "drop"])
    state = run(file_server.url("c10.tar.gz"), md5, tmp_path)
    assert state.is_completed()
    assert len(file_server.requests) == 3
    assert file_server.requests[-1][1] is not None and file_server.requests[-1][1].startswith("bytes=")


def test_permanent_failures_are_not_retried(prefect_api, file_server, tmp_path, no_retry_delay):
    state = run(file_server.url("missing.tar.gz"), "0" * 32, tmp_path)
    assert state.is_failed()
    with pytest.raises(DownloadError, match="HTTP 404"):
        state.result()
    assert len(file_server.requests) == 1


def test_a_folder_is_cached_until_it_changes(prefect_api, tmp_path):
    """The Prefect key sees the folder's files (a stat walk), so new pictures are never a stale hit."""
    data = tmp_path / "photos"
    make_folder(data, classes=2, per_class=10)
    params = dict(data_dir=str(data), image_size=32, cache_dir=str(tmp_path / "cache"))
    first = prepare_flow.prepare_data(**params, return_state=True)
    assert task_states(first) == {"download": "Completed", "build-cache": "Completed"}, "a folder is read where it is"
    again = prepare_flow.prepare_data(**params, return_state=True)
    assert task_states(again) == {"download": "Cached", "build-cache": "Cached"}
    make_folder(data, classes=2, per_class=1, start=10)
    third = prepare_flow.prepare_data(**params, return_state=True)
    assert task_states(third) == {"download": "Cached", "build-cache": "Completed"}
    assert sum(inspect_cache(third.result()).counts.values()) == 22
    assert dict(inspect_cache(third.result()).summary)["decoded"] == 2


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return buffer.getvalue()


def test_a_zip_of_a_folder_by_url_and_its_next_version(prefect_api, file_server, tmp_path):
    make_folder(tmp_path / "photos", classes=2, per_class=10)
    file_server.files["photos.zip"] = zipped(tmp_path / "photos")
    md5 = hashlib.md5(file_server.files["photos.zip"]).hexdigest()
    state = run(file_server.url("photos.zip"), md5, tmp_path, dataset=None, valid_size=None, test_size=4)
    assert task_states(state) == {"download": "Completed", "build-cache": "Completed"}
    info = inspect_cache(state.result())
    assert info.dataset == "folder" and info.class_names == ("class-0", "class-1") and info.counts["test"] == 4

    # Next week the same URL serves a bigger archive: a version of the same folder.
    make_folder(tmp_path / "photos", classes=2, per_class=2, start=10)
    file_server.files["photos.zip"] = zipped(tmp_path / "photos")
    md5 = hashlib.md5(file_server.files["photos.zip"]).hexdigest()
    grown = inspect_cache(run(file_server.url("photos.zip"), md5, tmp_path, valid_size=None, test_size=4).result())
    assert dict(grown.summary)["decoded"] == 4 and dict(grown.summary)["reused"] == 20
    assert grown.source_id == info.source_id, "one champion line for every version of the URL"
