"""Predictions for your own pictures from a saved model (a run's model/ or the champion).

Images are decoded by `tasks.images` (any mode, 16-bit included), resized by the kernel the
cache uses for CIFAR-sized images (anti-aliased bilinear for larger photos), and scored in
batches of `batch_size`, so a folder of photos never has to fit in memory at once. One bad
image is reported and the rest still run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tnflow.tasks.images import ImageError, load_square
from tnflow.tasks.model_dir import CHECKPOINT, read_model_dir
from tnflow.tasks.settings import ModelSpec

TOP_K = 3
BATCH_SIZE = 32


def load_image(path: str | Path, size: int, resize: str = "crop") -> np.ndarray:
    """uint8 RGB (size, size, 3) from an image file of any size and mode, squared as in training."""
    return load_square(path, size, resize)


def predict_files(
    model_dir: str | Path, paths: list[str], top: int = TOP_K, batch_size: int = BATCH_SIZE
) -> Iterator[dict[str, Any]]:
    """Per image, in order: {"image", "top": [{"class", "probability"}]} or {"image", "error"}."""
    from tnflow.tasks.model import build, open_session, predict  # TensorFlow: only when predicting

    meta = read_model_dir(model_dir)
    spec = ModelSpec.from_meta(meta)
    names = meta["class_names"]
    net = build(spec)
    with open_session(net) as session:
        net.model_saver.restore(session, str(Path(model_dir) / CHECKPOINT))
        for start in range(0, len(paths), batch_size):
            results, loaded = [], []
            for path in paths[start : start + batch_size]:
                try:
                    loaded.append((len(results), load_image(path, spec.image_size, meta.get("resize", "crop"))))
                    results.append({"image": path})
                except (OSError, ImageError) as exc:
                    results.append({"image": path, "error": f"cannot read {path}: {exc}"})
            if loaded:
                probs = predict(session, net, np.stack([image for _, image in loaded]))
                for (index, _), row in zip(loaded, probs, strict=True):
                    best = np.argsort(-row)[:top]
                    results[index]["top"] = [{"class": names[c], "probability": float(row[c])} for c in best]
            yield from results
