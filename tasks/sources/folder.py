"""Image folders as a source: find the classes and splits, fingerprint every file, plan the splits.

Two layouts:
    DIR/<class>/<image>                            tnflow carves test and validation splits
    DIR/train/<class>/..., DIR/test/<class>/...    the splits as given (val/, valid/ or
                                                   validation/ is the validation split, or
                                                   the test split when there is no test/)

A version of a folder is the digest of its manifest (relative path, size, content digest).
Content digests are kept in a stat index beside the caches, so an unchanged file is not read
again: a re-scan of 100,000 files is a directory walk. Splits are planned from the scan
(`tasks.sources.folder_splits`) (`tasks.sources.folder_splits`). Nothing here decodes pixels; that is
`tasks.sources.decode`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import full_disk_ends, is_utf8, shown_name, write_atomic
from tnflow.tasks.core.progress import run_logger

SPLIT_DIRS = {"train": "train", "test": "test", "val": "valid", "valid": "valid", "validation": "valid"}
_READ_BYTES = 1 << 20


class Entry(NamedTuple):
    """One file of a class folder, before decoding.

    A named tuple, not a frozen dataclass: a scan makes one per file, and at a million files the
    dataclass's field-by-field `__init__` and per-object dict were a second of a re-scan and
    most of its objects' memory.
    """

    path: str  # relative to the dataset root, with forward slashes
    label: int
    pool: str  # the split the layout gives it ("train", "valid", "test"), or "" when tnflow decides
    size: int
    digest: str  # sha256 of the content; "" when the file could not be read
    problem: str = ""  # why it cannot be used before even decoding it (empty, unreadable)


@dataclass
class Scan:
    root: Path
    layout: str  # "classes" or "splits"
    class_names: tuple[str, ...]
    entries: list[Entry]
    ignored: list[str]  # hidden files, files where class folders are expected, unknown folders
    version: str = ""

    def manifest(self) -> list[tuple[str, int, str]]:
        return sorted((e.path, e.size, e.digest) for e in self.entries)


# -- scanning -----------------------------------------------------------------------------


def scan_folder(root: str | Path, index_path: Path | None = None) -> Scan:
    """Classes, splits and fingerprinted files of a dataset folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder; give a folder of class folders (DIR/<class>/<image>)")
    ignored: list[str] = []
    subdirs = _subdirs(root, ignored, root)
    pools = {SPLIT_DIRS[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_DIRS}
    if "train" in pools and len(pools) > 1:
        layout = "splits"
        named = [d for d in subdirs if d.name.lower() in SPLIT_DIRS]
        if len(named) != len(pools):
            raise DataError(
                f"{root} has more than one validation folder ({', '.join(d.name for d in named)}); keep one"
            )
        ignored += [_rel(d, root) + "/" for d in subdirs if d.name.lower() not in SPLIT_DIRS]
        if "test" not in pools:  # the ImageNet convention: val/ is what the model is tested on
            pools["test"] = pools.pop("valid")
        class_dirs = {pool: {d.name: d for d in _subdirs(folder, ignored, root)} for pool, folder in pools.items()}
        names = sorted(set().union(*class_dirs.values()))
        for pool, found in class_dirs.items():
            missing = [n for n in names if n not in found]
            if missing:
                raise DataError(
                    f"class {missing[0]!r} has no folder in {pools[pool].name}/ (found in another split); "
                    "every split needs the same class folders"
                )
        folders = [(pool, names.index(name), d) for pool, found in class_dirs.items() for name, d in found.items()]
    else:
        layout = "classes"
        names = sorted(d.name for d in subdirs)
        folders = [("", names.index(d.name), d) for d in subdirs]
    if len(names) < 2:
        raise DataError(f"{root} has {len(names)} class folder(s); a classifier needs at least 2 (DIR/<class>/<image>)")
    files = [(pool, label, *file) for pool, label, folder in folders for file in _files(folder, ignored, root)]
    entries = _fingerprint(files, index_path)
    scan = Scan(root, layout, tuple(names), entries, sorted(ignored))
    blob = json.dumps([layout, scan.manifest()]).encode()
    scan.version = hashlib.sha256(blob).hexdigest()
    return scan


def _rel(path: Path, root: Path) -> str:
    """The path as recorded: valid UTF-8 always (undecodable bytes shown as \\xNN), so any file name can be listed."""
    return shown_name(path.relative_to(root).as_posix())


def _subdirs(folder: Path, ignored: list[str], root: Path) -> list[Path]:
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name == "__MACOSX" or not entry.is_dir():
            ignored.append(_rel(Path(entry.path), root))
        elif not is_utf8(entry.name):
            ignored.append(f"{_rel(Path(entry.path), root)}/ (a folder name that is not UTF-8 cannot name a class)")
        else:
            found.append(Path(entry.path))
    return found


def _files(folder: Path, ignored: list[str], root: Path) -> Iterable[tuple[str, str]]:
    """(relative POSIX path, absolute path) of every file under `folder`, as plain strings.

    Strings, not `Path` objects: at a million files, making and relating two `Path`s per file was
    two thirds of a re-scan (`benchmarks/bench_scale.py`).
    """
    prefix = len(os.path.join(str(root), ""))
    for current, dirs, names in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(current, d))]
        ignored += [f"{_rel(Path(current) / d, root)}/ (a linked folder, not followed)" for d in links]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in links)
        relative = current[prefix:].replace(os.sep, "/")
        for name in sorted(names):
            if name.startswith("."):
                ignored.append(shown_name(f"{relative}/{name}"))
            else:
                yield f"{relative}/{name}", os.path.join(current, name)


def _fingerprint(files: list[tuple[str, int, str, str]], index_path: Path | None) -> list[Entry]:
    """Entries with content digests, read only for files the stat index has not seen as they are."""
    index = _read_index(index_path)
    new_index: dict[str, list] = {}
    todo: list[tuple[int, str]] = []
    out: list[Entry | None] = []
    for pool, label, rel, path in files:
        if not is_utf8(rel):
            out.append(Entry(shown_name(rel), label, pool, 0, "", "file name is not valid UTF-8; rename it"))
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            out.append(Entry(rel, label, pool, 0, "", f"unreadable: {exc.strerror or exc}"))
            continue
        if st.st_size == 0:
            out.append(Entry(rel, label, pool, 0, "", "empty file"))
            continue
        known = index.get(rel)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            out.append(Entry(rel, label, pool, st.st_size, known[2]))
            new_index[rel] = known
        else:
            todo.append((len(out), path))
            out.append(Entry(rel, label, pool, st.st_size, ""))
            new_index[rel] = [st.st_size, st.st_mtime_ns, ""]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # hashing releases the GIL
        for (i, _), (digest, problem) in zip(todo, pool.map(lambda t: _digest(t[1]), todo), strict=True):
            entry = out[i]
            out[i] = Entry(entry.path, entry.label, entry.pool, entry.size, digest, problem)
            if digest:
                new_index[entry.path][2] = digest
            else:
                new_index.pop(entry.path)
    if index_path is not None and new_index != index:
        with full_disk_ends("scanning the folder (writing its index of file digests)", index_path):
            index_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(index_path, json.dumps(new_index))  # two scans may race: either result is right
    return [e for e in out if e is not None]


def _digest(path: str) -> tuple[str, str]:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_READ_BYTES):
                digest.update(block)
    except OSError as exc:
        return "", f"unreadable: {exc.strerror or exc}"
    return digest.hexdigest(), ""


def _read_index(path: Path | None) -> dict[str, list]:
    """The stat index; a damaged one is rebuilt (every file is read again once) and says so."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and all(isinstance(v, list) and len(v) == 3 for v in data.values()):
        return data
    run_logger().warning("the stat index %s is damaged: every file is read again once to rebuild it", path)
    return {}
