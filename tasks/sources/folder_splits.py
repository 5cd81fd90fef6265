"""Which image of a folder goes to train, valid and test: each content once, splits that never move.

Splits are assigned by a seeded hash of each image's content and are sticky: an image keeps
the split it had in the previous version of the folder, and new images fill each class's
quota (stratified), so no old test image ever moves into training as the folder grows. The
same content twice is kept once; a copy in training of a test (or validation) image is
removed from training (leakage) and counted.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from tnflow.tasks.config.specs import FolderSpec
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.sources.folder import Entry, Scan
from tnflow.tasks.sources.splits import class_quotas, limited


@dataclass
class Plan:
    """Which image goes where, and what was left out before decoding."""

    splits: dict[str, list[Entry]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, the copy that was kept)
    leaked: list[str] = field(default_factory=list)  # training copies of test (or validation) images
    assignment: dict[str, str] = field(default_factory=dict)  # digest -> split, before any --limit-* subset
    class_names: tuple[str, ...] = ()  # the classes trained on: the scan's, but those left out
    left_out: dict[str, str] = field(default_factory=dict)  # class -> why it was left out


def plan_splits(scan: Scan, spec: FolderSpec, previous: dict[str, str] | None = None) -> Plan:
    """Train, valid and test images: each content once, test copies win, splits sticky.

    `previous` maps content digests to the split they had in the previous version.
    """
    previous = previous or {}
    plan = Plan(splits={"train": [], "valid": [], "test": []})
    usable = []
    for entry in scan.entries:
        if entry.problem:
            plan.skipped.append((entry.path, entry.problem))
        else:
            usable.append(entry)
    priority = {"test": 0, "valid": 1, "train": 2, "": 3}
    kept: dict[str, Entry] = {}
    for entry in sorted(usable, key=lambda e: (priority[e.pool], e.path)):
        first = kept.setdefault(entry.digest, entry)
        if first is entry:
            continue
        if first.pool != entry.pool:
            plan.leaked.append(entry.path)
        else:
            plan.duplicates.append((entry.path, first.path))
    images = sorted(kept.values(), key=lambda e: e.path)
    if not images:
        raise DataError(f"{scan.root} holds no readable images; put pictures in DIR/<class>/ folders")
    images = _without_thin_classes(images, scan, spec.strict_classes, plan)
    given = defaultdict(list)
    for entry in images:
        given[entry.pool].append(entry)
    plan.splits["test"] += given["test"]
    plan.splits["valid"] += given["valid"]
    carve = given[""] + (given["train"] if not given["valid"] else [])
    if scan.layout == "splits" and not given["valid"]:
        plan.splits["train"] += _carve(carve, {"valid": spec.valid_size}, spec.seed, previous, plan.splits)
    elif scan.layout == "splits":
        plan.splits["train"] += given["train"]
    else:
        sizes = {"test": spec.test_size, "valid": spec.valid_size}
        plan.splits["train"] += _carve(carve, sizes, spec.seed, previous, plan.splits)
    # Kept in the manifest: the next version's splits follow it, whatever subset this one trained on.
    plan.assignment = {e.digest: split for split, rows in plan.splits.items() for e in rows}
    rng = np.random.default_rng(spec.seed)
    for split, limit in (("train", spec.limit_train), ("test", spec.limit_test)):
        rows = plan.splits[split]
        if limit is not None:
            labels, what = np.array([e.label for e in rows]), f"{split} images of {scan.root}"
            picked = limited(labels, split, limit, what, rng, every_class=True)
            plan.splits[split] = [rows[i] for i in picked]
    return plan


def _without_thin_classes(images: list[Entry], scan: Scan, strict: bool, plan: Plan) -> list[Entry]:
    """Leave out the classes with fewer than 2 usable pictures (one to train on, one to test), and say why.

    A user who makes the folder of a new class before filling it must not stop every retrain;
    `strict` (--strict-classes) stops the build instead. The classes kept are numbered again.
    """
    per_class = Counter(e.label for e in images)
    thin = [label for label in range(len(scan.class_names)) if per_class[label] < 2]
    for label in thin:
        name, count = scan.class_names[label], per_class[label]
        why = f"{count} usable picture{'' if count == 1 else 's'}; a class needs 2 (one to train on, one to test)"
        if strict:
            raise DataError(f"class {name!r} has {why}: add pictures, or drop --strict-classes to train without it")
        plan.left_out[name] = why
    kept = [label for label in range(len(scan.class_names)) if label not in thin]
    if len(kept) < 2:
        names = ", ".join(f"{scan.class_names[label]!r} ({per_class[label]})" for label in kept + thin)
        raise DataError(
            f"{scan.root} has {len(kept)} class(es) with 2 usable pictures or more ({names}); training needs 2 classes"
        )
    plan.class_names = tuple(scan.class_names[label] for label in kept)
    if not thin:
        return images
    number = {old: new for new, old in enumerate(kept)}
    return [e._replace(label=number[e.label]) for e in images if e.label in number]


def _carve(
    pool: list[Entry],
    sizes: dict[str, int | float],
    seed: int,
    previous: dict[str, str],
    splits: dict[str, list[Entry]],
) -> list[Entry]:
    """Move each class's quota of `pool` into the sized splits; returns what is left to train on.

    Quotas are per class (stratified); images the previous version had placed keep their
    place, and new images are taken in the order of a seeded hash of their content, which
    no insertion or renaming changes.
    """
    labels = np.array([e.label for e in pool])
    for split, size in sizes.items():
        if size >= len(pool) or (size < 1 and round(size * len(pool)) >= len(pool)):
            raise DataError(
                f"--{split}-size {size:g} leaves no images to train on: there are {len(pool)}; choose a smaller one"
            )
    quotas = {split: class_quotas(labels, size) for split, size in sizes.items()}
    by_class: dict[int, list[Entry]] = defaultdict(list)
    for entry in pool:
        by_class[entry.label].append(entry)
    train = []
    for label, members in sorted(by_class.items()):
        members.sort(key=lambda e: _rank(seed, e.digest))
        placed = {split: [e for e in members if previous.get(e.digest) == split] for split in sizes}
        fresh = [e for e in members if e.digest not in previous]
        reserve = 0 if _trains(previous, members) else 1  # every class keeps an image to train on
        for split in sizes:  # test first: its quota is filled before validation's
            room = quotas[split].get(label, 0) - len(placed[split])
            room = min(max(room, 0), max(len(fresh) - reserve, 0))
            placed[split] += fresh[:room]
            fresh = fresh[room:]
            splits[split] += placed[split]
        taken = {e.digest for p in placed.values() for e in p}
        train += [e for e in members if e.digest not in taken]
    return train


def _trains(previous: dict[str, str], members: list[Entry]) -> bool:
    """Whether a class already has an old training image (so new ones may all go elsewhere)."""
    return any(previous.get(e.digest) == "train" for e in members)


def _rank(seed: int, digest: str) -> bytes:
    return hashlib.sha256(f"{seed}:{digest}".encode()).digest()
