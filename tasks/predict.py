"""Predictions for your own pictures from a saved model (a run's model/ or the champion).

Images are prepared as in training: converted to RGB (grey replicated, alpha composited on
white), resized with the cache's bilinear kernel (square images no larger than the model's
input, such as CIFAR's 32x32) or scikit-image's anti-aliased bilinear resize (anything
else), then preprocessed in the graph. One bad image is reported and the rest still run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.cache import resize_batch
from tasks.model_dir import CHECKPOINT, ModelSpec, read_model_dir

TOP_K = 3


def load_image(path: str | Path, size: int) -> np.ndarray:
    """uint8 RGB (size, size, 3) from a PNG/JPEG of any size and mode."""
    from skimage import io
    from skimage.color import gray2rgb, rgba2rgb
    from skimage.transform import resize

    image = io.imread(path)
    if image.ndim == 2:
        image = gray2rgb(image)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = np.rint(rgba2rgb(image) * 255)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"unsupported image shape {image.shape}")
    image = np.clip(image, 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    if height == width and height <= size:
        return resize_batch(image[None], size)[0]
    out = resize(image, (size, size), order=1, mode="edge", anti_aliasing=height > size, preserve_range=True)
    return np.rint(out).astype(np.uint8)


def predict_files(model_dir: str | Path, paths: list[str], top: int = TOP_K) -> list[dict[str, Any]]:
    """Per image: {"image", "top": [{"class", "probability"}]} or {"image", "error"}."""
    from tasks.model import build, open_session, predict  # TensorFlow: only when predicting

    meta = read_model_dir(model_dir)
    spec = ModelSpec.from_meta(meta)
    results: list[dict[str, Any]] = []
    loaded: list[tuple[int, np.ndarray]] = []
    for path in paths:
        try:
            loaded.append((len(results), load_image(path, spec.image_size)))
            results.append({"image": path})
        except (OSError, ValueError) as exc:
            results.append({"image": path, "error": f"cannot read {path}: {exc}"})
    if not loaded:
        return results
    net = build(spec)
    with open_session(net) as session:
        net.model_saver.restore(session, str(Path(model_dir) / CHECKPOINT))
        probs = predict(session, net, np.stack([image for _, image in loaded]))
    names = meta["class_names"]
    for (index, _), row in zip(loaded, probs, strict=True):
        best = np.argsort(-row)[:top]
        results[index]["top"] = [{"class": names[c], "probability": float(row[c])} for c in best]
    return results
