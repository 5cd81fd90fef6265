"""How every stage writes a file: under a lock, to a temporary name, renamed when complete.

Runs overlap (a scheduled retrain next to an ad-hoc one) and processes get killed. A stage
that holds `exclusive(final)` is the only writer of `final`; a second run waits, saying in
its run log whose lock it waits for, then finds the finished file instead of building it
again. Nothing sits under a final name until it is complete, so a killed process leaves only
temporary files, which the next writer removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from tnflow.tasks.core.errors import DiskFullError, TnflowError
from tnflow.tasks.core.progress import run_logger

_TMP_MARK = ".tmp-"
WAIT_REPORT_SECONDS = 30.0  # how often a waiting run says it is still waiting, and for whom
POLL_SECONDS = 0.5
T = TypeVar("T")


def ensure_writable_dir(path: str | Path, option: str = "--cache-dir") -> Path:
    """Create `path` if needed and prove a file can be written there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TnflowError(f"{option} {path} is not a writable directory (it is a file); choose another with {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{_TMP_MARK}probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TnflowError(
            f"{option} {path} is not a writable directory ({exc.strerror or exc}); choose another with {option}"
        ) from None
    return path


@contextmanager
def exclusive(final: Path) -> Iterator[None]:
    """Hold an advisory lock for writing `final`; the OS releases it if the process dies.

    The lock file (`<final>.lock`, beside it, so runs on other hosts sharing the directory see
    it) is removed on release, so a finished `preds.csv` or model directory has no `.lock`
    beside it. Removing it while holding it is safe: a waiter that then gets the lock finds
    its file gone (another inode than the path's, or no path) and opens the path again. A
    process killed while holding it leaves the file, which the next holder takes over.
    """
    lock_path = final.with_name(final.name + ".lock")
    while True:
        handle = open(lock_path, "a+b")  # noqa: SIM115 - closed below, or kept for the block
        try:
            _acquire(handle, lock_path, final)
        except BaseException:
            handle.close()
            raise
        if _still_named(handle, lock_path):
            break
        handle.close()  # its holder removed it after we opened it: lock the path's current file
    with handle:
        try:
            handle.truncate(0)
            handle.write(json.dumps(whoami()).encode())
            handle.flush()
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _still_named(handle: IO[bytes], lock_path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
    except FileNotFoundError:
        return False


def _acquire(handle: IO[bytes], lock_path: Path, final: Path) -> None:
    """Take the lock, logging to the run's log whose lock this waits for, and for how long."""

    def report(waited: float) -> None:
        if waited < WAIT_REPORT_SECONDS:
            run_logger().info("waiting for %s, which holds %s", holder_of(lock_path), final)
        else:
            run_logger().info(
                "still waiting for %s, which holds %s (%.0f s so far)", holder_of(lock_path), final, waited
            )

    wait_for(lambda: try_lock(handle), report)


def wait_for(take: Callable[[], T], report: Callable[[float], None], poll: float = POLL_SECONDS) -> T:
    """Call `take` every `poll` seconds until it gives something true, and return that: every wait for
    a lock or a slot. `report(seconds waited)` runs at the first miss and every WAIT_REPORT_SECONDS
    after, so a waiting run always says for whom and how long."""
    started, next_report = time.monotonic(), 0.0
    while not (taken := take()):
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + WAIT_REPORT_SECONDS
            report(time.monotonic() - started)
        time.sleep(poll)
    return taken


def try_lock(handle: IO[bytes], *, shared: bool = False) -> bool:
    """Take `handle`'s flock without waiting (exclusive, or `shared`); False while another holds it."""
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def whoami() -> dict[str, object]:
    """This process as lock files and journals name it: its run (if any), process and host."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    return {
        "run": run.name if run else None,
        "run_id": str(run.id) if run else None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def holder_of(lock_path: Path) -> str:
    """Who holds a lock or a slot, as its holder wrote it down (`whoami`)."""
    try:
        record = json.loads(lock_path.read_bytes() or b"{}")
    except (OSError, ValueError):
        record = {}
    return describe_holder(record) if isinstance(record, dict) else "another run"


def describe_holder(record: dict[str, Any]) -> str:
    """A holder as every waiting line names it: run name and id, process and host."""
    if not record.get("run_id") and not record.get("pid"):
        return "another run"
    where = f"process {record.get('pid', '?')} on {record.get('host', '?')}"
    if record.get("run"):
        return f"run {record['run']!r} ({record['run_id']}, {where})"
    return f"another run ({where})"


def temp_path(final: Path) -> Path:
    """A unique temporary sibling of `final`; call only while holding `exclusive(final)`."""
    return final.with_name(f"{final.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def new_directory(final: Path) -> Iterator[Path]:
    """Fill a temporary sibling of `final`, then put it in place of `final` with one rename."""
    tmp = temp_path(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)  # left by a run killed before it was recorded
    os.replace(tmp, final)


@contextmanager
def renamed_when_complete(final: Path, stage: str = "building the cache") -> Iterator[Path]:
    """A temporary name to write `final` under (a file or a directory); renamed to `final` only if the block completes.

    Whatever stops the block (an error, a full disk, Ctrl-C) removes the temporary, so nothing
    that looks finished is ever left half-written.
    """
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):  # h5py's say so in their text alone
            raise disk_full_error(final, stage) from None
        raise


def write_atomic(path: Path, text: str) -> None:
    """Replace a small text file in one rename: readers see the old or the new content."""
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise


def switch_symlink(link: Path, target: Path) -> None:
    """Point `link` at `target` in one rename: readers see the old or the new target, never none."""
    tmp = temp_path(link)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def link_tree(source: str | Path, target: Path) -> None:
    """Copy a directory as hard links (no extra space), or as copies across file systems."""
    shutil.copytree(Path(source).resolve(), target, copy_function=link_or_copy, dirs_exist_ok=True)


def link_files(source: Path, names: list[str], target: Path) -> None:
    """Hard-link files `names` of directory `source` into `target` (copies across file systems), replacing any there."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).unlink(missing_ok=True)  # a retry in the same directory
        link_or_copy(source / name, target / name)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def remove_stale_temps(final: Path) -> None:
    """Delete temporaries left by killed writers of `final` (the caller holds its lock)."""
    for stale in final.parent.glob(f"{final.name}{_TMP_MARK}*"):
        run_logger().info("removing %s left by an interrupted run", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def shown_name(name: str) -> str:
    """A file name as outputs show it: valid UTF-8 whatever bytes it has (undecodable ones as `\\xNN`)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """False for a name with bytes of another system's encoding (Python holds them as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC, including h5py errors that only say so in their message."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)


def check_free_space(directory: Path, needed: int, option: str = "--cache-dir") -> None:
    """Fail before hours of work rather than at the end of them."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise TnflowError(
            f"{directory} has {_gb(free)} free but this needs {_gb(needed)}; free some space or choose another {option}"
        )


def disk_full_error(path: str | Path, stage: str) -> DiskFullError:
    return DiskFullError(f"no space left on {path} while {stage}; free space and run again (finished work is kept)")


@contextmanager
def full_disk_ends(stage: str, where: str | Path) -> Iterator[None]:
    """A full disk while `stage` writes under `where` ends the run in one line (a retry cannot free space)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(getattr(exc, "filename", None) or where, stage) from None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
