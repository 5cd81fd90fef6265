"""What a model learnt from, for its report and its model card: images per class and split, and the files left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tnflow.tasks.cache.contents import describe_cache
from tnflow.tasks.cache.h5cache import SPLITS, read_labels, read_manifest
from tnflow.tasks.core.files import shown_name
from tnflow.tasks.sources.archives import UNSAFE_MEMBER

SKIPPED_SHOWN = 50  # the manifest in the cache lists them all


def data_sections(cache_path: str | Path) -> dict[str, list[tuple]]:
    """What the model learnt from: classes with their images per split, and the files left out."""
    info = describe_cache(cache_path)
    names, summary = info.class_names, dict(info.summary)
    per_split = {s: np.bincount(read_labels(cache_path, s), minlength=len(names)) for s in SPLITS}
    manifest = read_manifest(cache_path)
    counts = [(n, *(int(per_split[s][i]) for s in per_split)) for i, n in enumerate(names)]
    counts.append(("all classes", *(int(c.sum()) for c in per_split.values())))
    source = [("source", shown_name(str(manifest.get("source", ""))) or "CIFAR archive"), *summary.items()]
    # A class folder without enough pictures is not trained on: the class list is shorter than the folder's.
    source += [(f"class left out: {name}", why) for name, why in manifest.get("left_out", {}).items()]
    left_out = [*manifest.get("skipped", []), *((m, UNSAFE_MEMBER) for m in manifest.get("unpacked_skipped", []))]
    skipped = [(p, r) for p, r in left_out[:SKIPPED_SHOWN]]
    more = len(left_out) - len(skipped)
    if more > 0:
        skipped.append((f"... and {more} more", "see the manifest in the cache file"))
    return {"data": source, "class_counts": counts, "skipped": skipped or [("none", "")]}
