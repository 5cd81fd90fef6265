"""The report's figures as a reader sees them."""

import numpy as np
import pytest

from tnflow.tasks.release.figures import sample_grid

NAMES = [f"class-with-a-long-name-{i}" for i in range(10)]


@pytest.mark.parametrize("count", [8, 12], ids=["two-rows", "three-rows"])
def test_sample_captions_do_not_cover_the_pictures_above(count):
    samples = [{"index": i, "label": i % 10, "top": [[i % 10, 0.61], [1, 0.3], [2, 0.09]]} for i in range(count)]
    fig = sample_grid(np.zeros((count, 32, 32, 3), np.uint8), samples, NAMES)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    for upper, lower in zip(axes, axes[4:], strict=False):
        if not lower.images:
            continue
        picture = upper.images[0].get_window_extent(renderer)
        caption = lower.title.get_window_extent(renderer)
        assert caption.y1 <= picture.y0, (
            f"caption reaches {caption.y1:.0f}px, the picture above starts at {picture.y0:.0f}px"
        )
    for axis in axes:  # each caption also stays clear of its own picture
        if axis.images:
            assert axis.title.get_window_extent(renderer).y0 >= axis.images[0].get_window_extent(renderer).y1 - 1
