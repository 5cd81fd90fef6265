import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from tnflow.tasks.core.errors import DownloadError, TransientDownloadError
from tnflow.tasks.sources.download import fetch, target_path

BODY = os.urandom(3 << 20)  # three read blocks, so a dropped connection leaves a real partial file
MD5 = hashlib.md5(BODY).hexdigest()


@pytest.fixture
def served(file_server):
    file_server.files["data.tar.gz"] = BODY
    return file_server, file_server.url("data.tar.gz")


def test_http_download_is_verified_and_reused(served, tmp_path):
    server, url = served
    got = fetch(url, tmp_path, MD5)
    assert Path(got.path) == target_path(url, tmp_path, MD5)
    assert Path(got.path).read_bytes() == BODY and got.md5 == MD5 and got.size == len(BODY)
    assert fetch(url, tmp_path, MD5) == got
    assert len(server.requests) == 1, "a verified file must not be downloaded again"


def test_resumes_after_a_dropped_connection(served, tmp_path):
    server, url = served
    server.faults.append("drop")
    with pytest.raises(TransientDownloadError, match="will resume"):
        fetch(url, tmp_path, MD5)
    final = target_path(url, tmp_path, MD5)
    part = final.with_name(final.name + ".part")
    assert not final.exists(), "nothing half-written may sit under the final name"
    kept = part.stat().st_size
    assert 0 < kept < len(BODY)

    got = fetch(url, tmp_path, MD5)
    assert server.requests[-1] == ("data.tar.gz", f"bytes={kept}-")
    assert Path(got.path).read_bytes() == BODY
    assert not part.exists()


def test_server_that_ignores_range_restarts_cleanly(served, tmp_path):
    server, url = served
    server.faults.extend(["drop", "ignore-range"])
    with pytest.raises(TransientDownloadError):
        fetch(url, tmp_path, MD5)
    assert Path(fetch(url, tmp_path, MD5).path).read_bytes() == BODY


def test_server_error_is_transient(served, tmp_path):
    server, url = served
    server.faults.append("500")
    with pytest.raises(TransientDownloadError, match="HTTP 500"):
        fetch(url, tmp_path, MD5)
    assert Path(fetch(url, tmp_path, MD5).path).read_bytes() == BODY


def test_not_found_is_permanent_and_names_the_url(file_server, tmp_path):
    url = file_server.url("missing.tar.gz")
    with pytest.raises(DownloadError, match="HTTP 404") as raised:
        fetch(url, tmp_path, MD5)
    assert not isinstance(raised.value, TransientDownloadError)
    assert url in str(raised.value)


def test_wrong_digest_deletes_the_bytes_and_names_both_digests(served, tmp_path):
    server, url = served
    server.faults.append("corrupt")
    with pytest.raises(DownloadError) as raised:
        fetch(url, tmp_path, MD5)
    message = str(raised.value)
    bad = hashlib.md5(bytes(b ^ 0xFF for b in BODY[:64]) + BODY[64:]).hexdigest()
    assert MD5 in message and bad in message
    final = target_path(url, tmp_path, MD5)
    assert not final.exists() and not final.with_name(final.name + ".part").exists()


def test_unreachable_host_is_transient_with_the_url(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/data.tar.gz"
    with pytest.raises(TransientDownloadError, match="cannot connect") as raised:
        fetch(url, tmp_path, MD5, timeout=5)
    assert url in str(raised.value)


@pytest.mark.parametrize("form", ["file-url", "plain-path"])
def test_local_copies(tmp_path, form):
    source = tmp_path / "src" / "cifar.tar.gz"
    source.parent.mkdir()
    source.write_bytes(BODY)
    url = source.as_uri() if form == "file-url" else str(source)
    got = fetch(url, tmp_path / "cache", MD5)
    assert Path(got.path).read_bytes() == BODY and Path(got.path) != source


def test_missing_local_file(tmp_path):
    with pytest.raises(DownloadError, match=r"no such file; check the path given to --data-url$"):
        fetch(str(tmp_path / "nope.tar.gz"), tmp_path, MD5)


def test_unsupported_scheme(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        fetch("ftp://example.org/x.tar.gz", tmp_path, MD5)


def test_a_tampered_final_file_is_fetched_again(served, tmp_path):
    server, url = served
    final = Path(fetch(url, tmp_path, MD5).path)
    final.write_bytes(b"tampered")
    assert Path(fetch(url, tmp_path, MD5).path).read_bytes() == BODY
    assert len(server.requests) == 2


def test_concurrent_fetches_download_once(served, tmp_path):
    server, url = served
    results, errors = [], []

    def worker():
        try:
            results.append(fetch(url, tmp_path, MD5))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.path for r in results}) == 1 and len(results) == 4
    assert len(server.requests) == 1


def test_a_local_file_edited_in_place_is_copied_again(tmp_path):
    source = tmp_path / "weights.h5"
    source.write_bytes(b"first version")
    first = fetch(str(source), tmp_path / "cache")
    source.write_bytes(b"second version, same path")
    second = fetch(str(source), tmp_path / "cache")
    assert Path(second.path).read_bytes() == b"second version, same path"
    assert first.path != second.path and first.md5 != second.md5, "copies are keyed by content"
