"""Archives of image folders (.zip, .tar, .tar.gz) unpacked safely into the cache directory.

An archive from the internet is hostile: a member with an absolute path, a `..` component, a
link or a device could write outside the target or point at files that are not the
archive's. Such members are skipped (and listed), never written. The unpacked folder is
built under a temporary name and renamed when complete, at a path keyed by the archive's
digest, so a re-run finds it and a killed unpack leaves nothing that looks finished.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import check_free_space, exclusive, new_directory, remove_stale_temps, write_atomic
from tnflow.tasks.store.layout import unpacked_dir, unpacked_skipped

# Why a member is in the manifest's `unpacked_skipped`: it would have been written outside the folder.
UNSAFE_MEMBER = "not unpacked from the archive (an absolute path, '..' or a link)"


def unpack(archive: str | Path, digest: str, cache_dir: str | Path) -> tuple[Path, list[str]]:
    """The folder an archive holds, unpacked once under `cache_dir/unpacked/<digest>`, and the
    members that were not written (unsafe names, links, devices)."""
    final, listing = unpacked_dir(cache_dir, digest), unpacked_skipped(cache_dir, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final):
        if not final.is_dir():
            remove_stale_temps(final)
            with new_directory(final) as tmp:
                skipped = _unpack_into(Path(archive), tmp)
                write_atomic(listing, "".join(f"{name}\n" for name in skipped))
        skipped = listing.read_text().splitlines() if listing.is_file() else []
    return dataset_root(final), skipped


def dataset_root(folder: Path) -> Path:
    """Step into single wrapping folders (`photos.zip` -> `photos/cat/...`)."""
    while True:
        entries = [e for e in folder.iterdir() if not e.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in ("train", "test", "val"):
            return folder
        folder = entries[0]


def _safe_name(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        return None
    return path


def _unpack_into(archive: Path, target: Path) -> list[str]:
    if zipfile.is_zipfile(archive):
        return _unzip(archive, target)
    try:
        with tarfile.open(archive) as tar:
            return _untar(tar, target)
    except tarfile.TarError as exc:
        raise DataError(f"{archive} is neither a zip nor a tar archive ({exc}); give a .zip, .tar or .tar.gz") from None


def _unzip(archive: Path, target: Path) -> list[str]:
    skipped = []
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        check_free_space(target, sum(m.file_size for m in members) + (16 << 20))
        for member in members:
            name = _safe_name(member.filename)
            mode = member.external_attr >> 16
            if name is None or stat.S_ISLNK(mode) or (mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
                skipped.append(member.filename)
                continue
            if member.is_dir():
                _place(target / name, None)
            else:
                with zf.open(member) as source:
                    _place(target / name, source)
    return skipped


def _untar(tar: tarfile.TarFile, target: Path) -> list[str]:
    skipped = []
    for member in _members(tar):
        name = _safe_name(member.name)
        if name is None or not (member.isfile() or member.isdir()):
            skipped.append(member.name)
            continue
        source = None if member.isdir() else tar.extractfile(member)
        if member.isfile() and source is None:
            skipped.append(member.name)
            continue
        _place(target / name, source)
    return skipped


def _place(path: Path, source: IO[bytes] | None) -> None:
    """A directory (no `source`), or a file with `source`'s bytes."""
    if source is None:
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with source, open(path, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members as they stream by: a .tar.gz is read once, front to back."""
    while (member := tar.next()) is not None:
        yield member
