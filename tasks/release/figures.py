"""The reports' figures: learning curves, confusion matrix, sample images, reliability, a sweep's accuracy by option."""

from __future__ import annotations

import io
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is drawn.

    Not at import: matplotlib costs a second of every process that imports the flows, most of
    which (a killed run, a refused option, a cached stage) draw nothing, and choosing a backend
    is a process-wide edit that importing a module must not make.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, Any]]) -> plt.Figure:
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, metric in ((loss, "loss"), (accuracy, "accuracy")):
        axis.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        axis.plot(epochs, [r[f"valid_{metric}"] for r in history], "s-", label="valid")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.set_xticks(epochs)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    return fig


HEATMAP_CLASSES = 50  # above it a confusion matrix is no figure a reader can read: the pairs table says it
CONFUSED_PAIRS = 10


def shows_heatmap(names: list[str]) -> bool:
    return len(names) <= HEATMAP_CLASSES


def confused_pairs(confusion: list[list[int]], names: list[str], top: int = CONFUSED_PAIRS) -> list[tuple]:
    """The `top` largest off-diagonal cells, largest first: what the model mistakes for what (any number of classes)."""
    matrix = np.asarray(confusion, dtype=np.int64)
    totals = matrix.sum(axis=1)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    count = min(top, int((flat > 0).sum()))
    if not count:
        return [("none", "", 0, "")]
    cells = np.argpartition(-flat, count - 1)[:count]
    cells = cells[np.lexsort((cells, -flat[cells]))]  # largest first; ties in matrix order
    rows, cols = np.unravel_index(cells, off.shape)
    pairs = zip(rows, cols, strict=True)
    return [(names[r], names[c], int(off[r, c]), f"{off[r, c] / totals[r]:.1%}") for r, c in pairs]


def confusion_heatmap(confusion: list[list[int]], class_names: list[str]) -> plt.Figure:
    plt = _pyplot()
    matrix = np.asarray(confusion)
    size = max(4.0, min(14.0, 0.45 * len(class_names) + 2))
    fig, axis = plt.subplots(figsize=(size, size * 0.85))
    image = axis.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=axis, fraction=0.046)
    ticks = range(len(class_names))
    show_names = len(class_names) <= 20
    axis.set_xticks(ticks, class_names if show_names else [], rotation=90)
    axis.set_yticks(ticks, class_names if show_names else [])
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if show_names:
        for (row, col), count in np.ndenumerate(matrix):
            color = "white" if count > matrix.max() / 2 else "black"
            axis.text(col, row, str(count), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    return fig


def sample_grid(images: np.ndarray, samples: list[dict[str, Any]], class_names: list[str]) -> plt.Figure:
    captions = []
    for sample in samples:
        top = "\n".join(f"{class_names[c]} {p:.0%}" for c, p in sample["top"])
        verdict = "right" if sample["top"][0][0] == sample["label"] else "wrong"
        captions.append(f"true: {class_names[sample['label']]} ({verdict})\n{top}")
    return picture_grid(list(images), captions, height=3.6)


def accuracy_by_option(trials: list[dict[str, Any]], options: list[str]) -> plt.Figure:
    """A panel per varied option: each finished trial's validation accuracy at its value of that option."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(options), figsize=(4.2 * len(options), 3.4), squeeze=False)
    for axis, name in zip(axes[0], options, strict=True):
        values = [trial["options"][name] for trial in trials]
        accuracy = [trial["valid_accuracy"] for trial in trials]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            axis.plot(values, accuracy, "o")
            if min(values) > 0 and max(values) / min(values) > 10:
                axis.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            axis.plot([labels.index(str(v)) for v in values], accuracy, "o")
            axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel(name)
        axis.set_ylabel("validation accuracy")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig


CAPTION_POINTS = 8


def picture_grid(
    images: list[np.ndarray], captions: list[str], columns: int = 4, height: float = 3.2, empty: str = ""
) -> plt.Figure:
    """Pictures with a caption each, `height` inches a row; `empty` is said when there are none.

    Each row keeps room above its pictures for the longest caption's lines, so a caption never
    reaches the row above. Placed by arithmetic, not by matplotlib's constrained layout, which
    solved the same thing iteratively in 0.7 s of every grid (two per report).
    """
    plt = _pyplot()
    rows = max(1, -(-len(images) // columns))
    width, total = 3.0 * columns, height * rows
    fig = plt.figure(figsize=(width, total))
    lines = max((caption.count("\n") + 1 for caption in captions), default=1)
    pad = 4.0  # points between a caption and its picture
    caption_inches = (lines * CAPTION_POINTS * 1.25 + pad) / 72 + 0.1  # with a margin above
    side = max(0.5, min(3.0 - 0.2, height - caption_inches - 0.1))
    for i, (image, text) in enumerate(zip(images, captions, strict=False)):
        row, column = divmod(i, columns)
        left = column * 3.0 + (3.0 - side) / 2
        bottom = total - row * height - caption_inches - side
        axis = fig.add_axes((left / width, bottom / total, side / width, side / total))
        axis.imshow(image)
        axis.set_title(text, fontsize=CAPTION_POINTS, pad=pad)
        axis.axis("off")
    if not images and empty:
        fig.text(0.02, 0.5, empty, fontsize=10)
    return fig


def reliability_diagram(calibration: dict[str, Any]) -> plt.Figure:
    """Accuracy against confidence per bin, raw and with the temperature; the diagonal is calibrated."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(4.6, 4.2))
    axis.plot([0, 1], [0, 1], "k:", label="calibrated")
    for key, label in (("before", "raw softmax"), ("after", f"T = {calibration['temperature']:.2f}")):
        rows = calibration[f"reliability_{key}"]
        ece = calibration[f"ece_{key}"]
        axis.plot(
            [r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", label=f"{label} (ECE {ece:.3f})"
        )
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def png(fig: plt.Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
