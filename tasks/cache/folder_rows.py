"""Writing one version of a folder cache: which rows it holds, in which order, and what marks it complete.

The write order, decided here and nowhere else: for each split in turn, first the rows the
previous version lends (unchanged pictures in their old order: its whole chunks as they are
stored, the rest `COPY_ROWS` at a time), then the new pictures, decoded in a seeded hash order
(so an unshuffled read of a split sees every class); the manifest and the summary last, by
`CacheWriter.finish`, which is what makes the file a complete cache. Bad files are skipped and
counted as they turn up; more than `--max-bad` of them stops the build early.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tnflow.tasks.cache.h5cache import (
    CHUNK_IMAGES,
    SPLITS,
    CacheWriter,
    image_offsets,
    read_digests,
    read_manifest,
    read_split_assignment,
)
from tnflow.tasks.config.specs import FolderSpec
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import check_free_space, shown_name
from tnflow.tasks.core.progress import ProgressFn
from tnflow.tasks.sources.folder import Entry, Scan
from tnflow.tasks.sources.folder_splits import Plan, plan_splits
from tnflow.tasks.sources.resize import RESIZE_METHOD

COPY_ROWS = 256  # reused images copied from the previous version per read
COPY_BYTES = 64 << 20  # or, as stored whole chunks, this many bytes of them per read (1,300 chunks at 32 px)


def write_folder_cache(
    out: Path,
    scan: Scan,
    spec: FolderSpec,
    *,
    identity: str,
    recipe: str,
    previous: Path | None,
    unpacked_skipped: list[str],
    pool: Any,
    progress: ProgressFn | None = None,
) -> None:
    """Write the cache of `scan` to `out`, reusing what `previous` (the lineage's last version) holds."""
    rows = read_digests(previous) if previous else {}
    before = read_manifest(previous) if previous else {}
    plan = plan_splits(scan, spec, read_split_assignment(previous) if previous else {})
    tally = _Tally(len(scan.entries), spec.max_bad, plan, before.get("bad_digests", {}))
    check_free_space(out.parent, tally.images * spec.image_size**2 * 3 + (64 << 20))
    writer = CacheWriter(out, _attributes(scan, plan, spec, identity), spec.image_size)
    try:
        with pool as decoding:
            for split in SPLITS:
                entries = sorted(plan.splits[split], key=lambda e: _row_order(spec.seed, e.digest))
                # One probe per picture: at a million, a dict probed in hash order is a cache miss each.
                found = [(rows.get(e.digest), e) for e in entries]
                reused = sorted(((where, e) for where, e in found if where is not None), key=lambda pair: pair[0])
                _copy_rows(previous, reused, writer, split, tally)
                fresh = [e for where, e in found if where is None]
                fresh = [e for e in fresh if not tally.known_bad(e)]  # skipped again, not decoded again
                _decode_rows(scan, fresh, spec, decoding, writer, split, tally, progress)
        tally.check(final=True)
        _every_class_trains(writer, plan.class_names)
        manifest = _manifest(scan, identity, previous, unpacked_skipped, plan, tally)
        writer.finish(manifest, tally.summary(scan), recipe)
    finally:
        writer.close()


@dataclass
class _Tally:
    """What the build has met so far: rows reused and decoded, files skipped, and the --max-bad check."""

    files: int
    max_bad: float
    plan: Plan
    bad_before: dict[str, str]  # digest -> why, from the previous version: not decoded again
    bad: dict[str, str] = field(default_factory=dict)
    reused: int = 0
    decoded: int = 0
    done: int = 0

    @property
    def images(self) -> int:
        return sum(len(v) for v in self.plan.splits.values())

    def known_bad(self, entry: Entry) -> bool:
        if entry.digest not in self.bad_before:
            return False
        self.skip(entry, self.bad_before[entry.digest])
        return True

    def skip(self, entry: Entry, problem: str) -> None:
        self.plan.skipped.append((entry.path, problem))
        self.bad[entry.digest] = problem

    def check(self, final: bool = False) -> None:
        skipped = self.plan.skipped
        if skipped and len(skipped) > self.max_bad * self.files:
            path, reason = skipped[0]
            count = f"{len(skipped)}" if final else f"at least {len(skipped)} (the build stopped there)"
            raise DataError(
                f"{count} of {self.files} files ({len(skipped) / self.files:.1%}) cannot be used, more than "
                f"--max-bad {self.max_bad:g}; the first: {path}: {reason}. Fix or remove them, or raise --max-bad"
            )

    def summary(self, scan: Scan) -> dict[str, int]:
        plan = self.plan
        return {
            "files": self.files,
            "skipped": len(plan.skipped),
            "duplicates": len(plan.duplicates),
            "leaked": len(plan.leaked),
            "ignored": len(scan.ignored),
            "reused": self.reused,
            "decoded": self.decoded,
        }


def _attributes(scan: Scan, plan: Plan, spec: FolderSpec, identity: str) -> dict[str, Any]:
    return {
        "dataset": spec.dataset,
        "class_names": list(plan.class_names),  # the scan's, but those left out for want of pictures
        "source_md5": scan.version,
        "source_id": short_digest(identity),
        "source": shown_name(identity),  # for people: the manifest keeps the path exactly
        "resize_method": RESIZE_METHOD,
        "resize": spec.resize,
        "valid_size": spec.valid_size,
        "test_size": spec.test_size,
        "seed": spec.seed,
    }


def _manifest(
    scan: Scan, identity: str, previous: Path | None, unpacked_skipped: list[str], plan: Plan, tally: _Tally
) -> dict[str, Any]:
    return {
        "version": scan.version,
        "source": identity,  # exactly, whatever bytes its name has (JSON escapes them)
        "layout": scan.layout,
        "previous": previous.name if previous else None,
        "skipped": sorted(plan.skipped),
        "left_out": plan.left_out,
        "duplicates": plan.duplicates,
        "leaked": plan.leaked,
        "ignored": scan.ignored,
        "unpacked_skipped": unpacked_skipped,
        "splits": plan.assignment,
        "bad_digests": tally.bad,
    }


def _row_order(seed: int, digest: str) -> str:
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def _columns(entries: list[Entry]) -> tuple[list[int], list[str], list[str]]:
    return [e.label for e in entries], [e.digest for e in entries], [e.path for e in entries]


def _copy_rows(
    previous: Path | None,
    reused: list[tuple[tuple[str, int], Entry]],
    writer: CacheWriter,
    split: str,
    tally: _Tally,
) -> None:
    """Append the previous version's pixels of `reused`: ((old split, old row), entry), in that order.

    Where the rows kept are whole chunks of the previous version and the new file is at a
    chunk's start, the chunks' stored bytes are copied as they are (when pictures were only
    added: every kept picture but a split's last partial chunk). Otherwise `COPY_ROWS` at a time.
    """
    if not reused or previous is None:
        return
    with h5py.File(previous, "r") as f:
        raw = {old: image_offsets(f[old]["images"]) is not None for old in SPLITS}  # stored whole and uncompressed
        start = 0
        while start < len(reused):
            (old, row), _ = reused[start]
            images = f[old]["images"]
            chunks = 0
            if raw[old] and writer.at_chunk_start(split, images.chunks):
                chunks = _whole_chunks(reused, start, max(1, COPY_BYTES // int(np.prod(images.chunks))))
            if chunks:
                block = reused[start : start + chunks * CHUNK_IMAGES]
                firsts = range(row, row + len(block), CHUNK_IMAGES)
                stored = [images.id.read_direct_chunk((r, 0, 0, 0))[1] for r in firsts]
                writer.append_chunks(split, stored, *_columns([e for _, e in block]))
            else:
                block = reused[start : start + COPY_ROWS]
                by_split: dict[str, list[int]] = {}
                ordered: dict[str, list[Entry]] = {}
                for (old_split, old_row), entry in block:
                    by_split.setdefault(old_split, []).append(old_row)
                    ordered.setdefault(old_split, []).append(entry)
                pixels = [_read_rows(f[name]["images"], rows) for name, rows in by_split.items()]
                writer.append(split, np.concatenate(pixels), *_columns([e for name in by_split for e in ordered[name]]))
            start += len(block)
    tally.reused += len(reused)


def _whole_chunks(reused: list[tuple[tuple[str, int], Entry]], start: int, most: int) -> int:
    """How many whole chunks of one old split (at most `most`) `reused[start:]` begins with.

    `reused` is sorted by (old split, old row), each once: a chunk is whole when its first row
    starts one and its last row is the first's plus `CHUNK_IMAGES - 1`.
    """
    (old, row), _ = reused[start]
    if row % CHUNK_IMAGES:
        return 0
    count = 0
    while count < most:
        last = start + (count + 1) * CHUNK_IMAGES - 1
        if last >= len(reused) or reused[last][0] != (old, row + (count + 1) * CHUNK_IMAGES - 1):
            break
        count += 1
    return count


def _read_rows(images: h5py.Dataset, rows: list[int]) -> np.ndarray:
    """`images[rows]`, `rows` increasing: read as one slice when they fill at least half of it.

    HDF5 selects a list of rows one hyperslab a row; the pictures a folder kept after some were
    removed are still mostly runs of consecutive rows, and one slice reads 300,000 of them in
    0.22 s against 0.39 s as lists (`benchmarks/README.md`, stop 45).
    """
    first, span = rows[0], rows[-1] - rows[0] + 1
    if span == len(rows):
        return images[first : first + span]
    if span <= 2 * len(rows):
        return images[first : first + span][np.asarray(rows) - first]
    return images[rows]


def _decode_rows(
    scan: Scan,
    fresh: list[Entry],
    spec: FolderSpec,
    decoding: Any,
    writer: CacheWriter,
    split: str,
    tally: _Tally,
    progress: ProgressFn | None,
) -> None:
    """Decode `fresh` in the decoder's jobs, in order; bad files are skipped and counted as they turn up."""
    jobs = _jobs(fresh, decoding.job_images, decoding.job_bytes)
    paths = ([str(scan.root / e.path) for e in job] for job in jobs)
    results = decoding.map(paths, spec.image_size, spec.resize, spec.max_pixels)
    for job, (images, problems) in zip(jobs, results, strict=True):
        for entry, problem in zip(job, problems, strict=True):
            if problem:
                tally.skip(entry, problem)
        good = [e for e, p in zip(job, problems, strict=True) if not p]
        if good:
            writer.append(split, images, *_columns(good))
        tally.decoded += len(good)
        tally.done += len(job)
        tally.check()
        if progress:
            progress(tally.done + tally.reused, tally.images)


def _jobs(entries: list[Entry], images: int, max_bytes: int) -> list[list[Entry]]:
    """`entries` cut in order into jobs of at most `images` files and `max_bytes` (a big file alone)."""
    jobs: list[list[Entry]] = []
    job: list[Entry] = []
    held = 0
    for entry in entries:
        if job and (len(job) == images or held + entry.size > max_bytes):
            jobs.append(job)
            job, held = [], 0
        job.append(entry)
        held += entry.size
    return [*jobs, job] if job else jobs


def _every_class_trains(writer: CacheWriter, class_names: tuple[str, ...]) -> None:
    present = set(np.unique(writer.labels("train")).tolist())
    missing = [name for label, name in enumerate(class_names) if label not in present]
    if missing:
        raise DataError(
            f"class {missing[0]!r} has no usable training image (its files were skipped or all went to the "
            "test and validation splits); add images or lower --test-size/--valid-size"
        )
