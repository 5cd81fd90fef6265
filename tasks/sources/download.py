"""Fetch any URL or path to a verified local file.

One attempt of `fetch` streams into `<final>.part`, resuming it with an HTTP Range request,
checks the md5 and renames; the Prefect task around it retries the failures that may pass
(`TransientDownloadError`) with backoff, and fails at once on the rest. The final path
depends only on the URL and digest (a local file's digest is computed from its content, so
a file edited in place is copied again), a re-run finds the file, and two runs never write
it at the same time (see `tasks.core.files`). A cached copy is reused only while its md5 still
matches, so a damaged copy is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import httpx
from prefect import task
from prefect.tasks import exponential_backoff

from tnflow.tasks.core.cache_policy import StageCache
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import DownloadError, TransientDownloadError
from tnflow.tasks.core.files import disk_full_error, ensure_writable_dir, exclusive, is_disk_full
from tnflow.tasks.core.progress import STAGE_HOOKS, Progress, ProgressFn, run_logger
from tnflow.tasks.core.retries import retry_on

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0
USER_AGENT = "tnflow/0.1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Fetched:
    """A verified local copy: what crosses the task boundary instead of bytes."""

    path: str
    md5: str | None  # None for a folder read where it is
    size: int


def target_path(url: str, dest_dir: str | Path, md5: str | None) -> Path:
    """Where `url` lands: keyed by its digest (or by the URL when no digest is known)."""
    name = Path(unquote(urlsplit(url).path)).name or "download"
    key = md5 or "url-" + short_digest(url)
    return Path(dest_dir) / "downloads" / key / name


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    url: str,
    dest_dir: str | Path,
    md5: str | None = None,
    *,
    timeout: float = TIMEOUT_SECONDS,
    progress: ProgressFn | None = None,
    option: str = "--data-url",
) -> Fetched:
    """Make a verified copy of `url` under `dest_dir`, reusing one that is already there.

    `option`: the one that named `url` (`--data-url` or `--weights`), which errors tell the user to fix.
    """
    if md5 is None and is_local(url):
        md5 = file_md5(_existing_local(url, option))  # keyed by content: an edited file is a new copy
    final = target_path(url, dest_dir, md5)
    ensure_writable_dir(final.parent)
    with exclusive(final):
        if final.exists():
            found = file_md5(final)
            if md5 is None or found == md5:
                return Fetched(str(final), found, final.stat().st_size)
            final.unlink()  # altered since we verified it; fetch it again
        part = final.with_name(final.name + ".part")
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            _fetch_http(url, part, timeout, progress, option)
        elif is_local(url):
            _copy_local(_existing_local(url, option), part, progress)
        else:
            raise DownloadError(f"{url}: unsupported URL scheme {scheme!r}; use https://, http://, file:// or a path")
        found = file_md5(part)
        if md5 is not None and found != md5:
            part.unlink()
            raise DownloadError(
                f"{url}: md5 is {found} but {md5} was expected; the bad copy was deleted. "
                f"Check the URL and its digest ({_DIGEST_OPTION.get(option, '--data-md5')})"
            )
        os.replace(part, final)
    return Fetched(str(final), found, final.stat().st_size)


def is_local(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("file", "")


_DIGEST_OPTION = {"--data-url": "--data-md5", "--weights": "--weights-md5"}
_INSTEAD = {
    "--weights": ", or --weights none to start from random weights",
    "--data-url": " (without a network the pretrained weights need a local copy too: --weights)",
}


def _existing_local(url: str, option: str = "--data-url") -> Path:
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        path = Path(url).expanduser()
    elif parts.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: file:// URLs must name a local path (file:///abs/path)")
    else:
        path = Path(unquote(parts.path))
    if not path.is_file():
        raise DownloadError(f"{path}: no such file; check the path given to {option}")
    return path


def source_identity(url: str) -> tuple[int, int] | None:
    """Size and modification time of a local source (what a cache key must see), else None."""
    if not is_local(url):
        return None
    try:
        stat = _existing_local(url).stat()
    except DownloadError:
        return None
    return stat.st_size, stat.st_mtime_ns


def is_intact(path: str | Path, md5: str | None) -> bool:
    """The file is there with the md5 recorded for it."""
    return Path(path).is_file() and file_md5(path) == md5


def fetched_is_sound(fetched: Fetched) -> bool:
    """A recorded copy is reusable while the file is there, unchanged."""
    return is_intact(fetched.path, fetched.md5)


def _copy_local(source: Path, part: Path, progress: ProgressFn | None) -> None:
    total = source.stat().st_size
    done = 0
    try:
        with _partial(part, "wb", f"copying {source}") as dst, open(source, "rb") as src:
            while block := src.read(CHUNK_BYTES):
                dst.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    except OSError as exc:
        raise DownloadError(f"cannot copy {source}: {exc.strerror or exc}") from None


@contextmanager
def _partial(part: Path, mode: str, doing: str) -> Iterator[BinaryIO]:
    """`part` open for writing; a full disk (in a write, or in the flush of its close) removes it.

    The error is the first one, with the path and what was being done: the close's own ENOSPC
    would otherwise replace it, and the partial file would keep the disk full.
    """
    try:
        with open(part, mode) as out:
            yield out
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        part.unlink(missing_ok=True)
        raise disk_full_error(part, f"{doing} (the partial file was removed)") from None


def _fetch_http(url: str, part: Path, timeout: float, progress: ProgressFn | None, option: str) -> None:
    """One attempt: append to `part` from where it stops; raise Transient for what may pass.

    The bytes are written as the server sends them (`iter_raw`): an archive served with a
    Content-Encoding is still the archive its md5 names.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    done = total = None
    try:
        with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
            status, reason = response.status_code, response.reason_phrase
            if status == 416 and have:
                return  # the partial file already holds every byte; the digest decides
            if status >= 500 or status in (408, 429):
                raise TransientDownloadError(f"{url}: HTTP {status} {reason}")
            if status >= 400:
                raise DownloadError(f"{url}: HTTP {status} {reason}; check the URL")
            if status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range", ""))
                if start != have:
                    part.unlink(missing_ok=True)
                    raise TransientDownloadError(f"{url}: server resumed at byte {start}, not {have}; restarting")
                mode = "ab"
            else:
                have, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            done = have
            with _partial(part, mode, f"downloading {url}") as out:
                for block in response.iter_raw():  # as received: a connection lost mid-way keeps every byte
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _connection_error(url, exc, option) from None
    except httpx.HTTPError as exc:  # the connection lost or timed out mid-body, or a broken response
        if done is None:
            raise _connection_error(url, exc, option) from None
        raise TransientDownloadError(f"{url}: connection lost after {done} bytes ({exc}); will resume") from None
    if total is not None and done < total:
        raise TransientDownloadError(f"{url}: connection closed after {done} of {total} bytes; will resume")


def _parse_content_range(value: str) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.match(value.strip())
    if not match:
        return -1, None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _connection_error(url: str, reason: BaseException, option: str) -> DownloadError:
    causes = [reason]
    while causes[-1].__context__ is not None and len(causes) < 10:
        causes.append(causes[-1].__context__)
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        host = urlsplit(url).hostname
        return DownloadError(
            f"{url}: cannot resolve host {host!r} (no network?); download the file elsewhere "
            f"and pass its path or file:// URL with {option}{_INSTEAD.get(option, '')}"
        )
    return TransientDownloadError(f"{url}: cannot connect ({reason})")


# -- Prefect ----------------------------------------------------------------------------

# Shared by every task that downloads: back off 2, 4, 8, 16 s on failures that may pass.
DOWNLOAD_RETRIES = dict(
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on(TransientDownloadError),
)


def source_is_sound(fetched: Fetched) -> bool:
    """A folder is read where it is (the cache stage sees what changed in it); a download must be intact."""
    return Path(fetched.path).is_dir() if fetched.md5 is None else fetched_is_sound(fetched)


@task(
    name="download",
    cache_policy=StageCache(
        identity=lambda inputs: None if inputs["folder"] else source_identity(inputs["url"]), sound=source_is_sound
    ),
    persist_result=True,
    **DOWNLOAD_RETRIES,
    **STAGE_HOOKS,
)
def source_task(*, folder: str | None, url: str, dest_dir: str, md5: str | None) -> Fetched:
    """The source's pictures on this machine: a `folder` (--data-dir) where it is, anything else fetched.

    Shown as the recipe's `download` stage, which it is for every source but a folder.
    """
    if folder is not None:
        return Fetched(path=folder, md5=None, size=0)
    progress = Progress(f"download {Path(urlsplit(url).path).name}", unit="B", logger=run_logger())
    fetched = fetch(url, dest_dir, md5, progress=progress)
    progress.finish()
    return fetched
