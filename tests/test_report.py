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


# -- the baselines and what to do next ------------------------------------------------------


def metrics_of(confusion, calibration=None):
    names = [f"class-{i}" for i in range(len(confusion))]
    return {"confusion_matrix": confusion, "class_names": names, "calibration": calibration or {}}


def test_a_model_at_chance_is_told_so_with_what_to_try():
    from tnflow.tasks.release.advice import baseline_lines, next_steps

    always_first = [[20, 0, 0, 0, 0]] + [[20, 0, 0, 0, 0]] * 4  # every picture called class-0
    metrics = metrics_of(always_first, {"applied": False, "why": "only 34 validation pictures"})
    lines = dict(baseline_lines(metrics))
    assert lines["test accuracy"] == "0.2000 on 100 images (95% interval 0.133-0.289)"
    assert lines["baselines"].startswith("always answering 'class-0' 0.2000, a uniform guess 0.2000; 0.200 is not")
    steps = next_steps(metrics, None, 3, {"weights": "none", "learning_rate": 1e-5, "epochs": 2})
    assert steps[0].startswith("At chance: 0.200 is not better than always answering 'class-0' (0.200, p = ")
    assert "--learning-rate, now 1e-05" in steps[0] and "start from pretrained weights" in steps[0]
    assert steps[1].startswith("Small test split: with 100 test pictures, gains under 11 points")
    assert steps[2].startswith("3 held-out pictures have labels the model disputes")
    assert steps[3] == "Calibration not applied (probabilities are the raw softmax): only 34 validation pictures."


def test_a_good_model_on_a_large_split_needs_nothing():
    from tnflow.tasks.release.advice import next_steps

    confusion = (np.eye(10, dtype=int) * 900 + 10).tolist()  # 90% right on 10,000 pictures
    steps = next_steps(metrics_of(confusion, {"applied": True}), None, 0, {})
    assert steps == ["Nothing stands out: the model beats the baselines and the test split can see small gains."]
    not_gated = {"detectable_gain": None, "detectable": "", "reason": "not considered (--no-promote ...)"}
    assert next_steps(metrics_of(confusion, {"applied": True}), not_gated, 0, {}) == steps, "no gate: the baseline's"
    gate = {"detectable_gain": 0.08, "detectable": "with 300 test pictures and 20% disagreement, gains under 8 points"}
    assert next_steps(metrics_of(confusion), gate, 0, {})[0] == f"Small test split: {gate['detectable']}."


def test_a_thousand_classes_get_the_most_confused_pairs_not_an_unreadable_matrix():
    from tnflow.tasks.release.figures import CONFUSED_PAIRS, confused_pairs, shows_heatmap

    names = [f"n{i:08d}" for i in range(1000)]
    rng = np.random.default_rng(0)
    confusion = np.diag(rng.integers(20, 50, 1000))
    confusion[3, 7], confusion[500, 2], confusion[999, 998] = 9, 12, 9  # the three mistakes that stand out
    confusion[rng.integers(0, 1000, 300), rng.integers(0, 1000, 300)] += 1  # and scattered single ones
    pairs = confused_pairs(confusion.tolist(), names)
    assert not shows_heatmap(names) and shows_heatmap(names[:10])
    assert len(pairs) == CONFUSED_PAIRS and pairs[:3] == [
        ("n00000500", "n00000002", 12, f"{12 / confusion[500].sum():.1%}"),
        ("n00000003", "n00000007", 9, f"{9 / confusion[3].sum():.1%}"),
        ("n00000999", "n00000998", 9, f"{9 / confusion[999].sum():.1%}"),
    ], pairs[:3]
    assert confused_pairs(np.diag([5, 5]).tolist(), ["a", "b"]) == [("none", "", 0, "")], "no mistake: said so"
