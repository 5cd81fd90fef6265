"""What a report's figures cost: tnflow's picture grid against matplotlib's constrained layout.

A report draws two picture grids (sample predictions, disputed labels) and three charts. The
grid places its pictures by arithmetic (tasks/release/figures.py); the peer is the same grid
laid out by matplotlib's constrained layout, as tnflow did before. Both render PNGs at the
report's resolution, alternating, in one process; CPU seconds, medians of `--repeat`:

    python benchmarks/bench_figures.py --pictures 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tnflow.tasks.release import figures


def constrained_grid(images: list[np.ndarray], captions: list[str], columns: int = 4, height: float = 3.6):
    """The peer: one subplot per picture, captions as titles, matplotlib's constrained layout."""
    plt = figures._pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, height * rows), squeeze=False, layout="constrained")
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, caption in zip(axes.ravel(), images, captions, strict=False):
        axis.imshow(image)
        axis.set_title(caption, fontsize=8)
    return fig


def cpu(make) -> float:
    started = time.process_time()
    figures.png(make())
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="pixels a side")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (args.pictures, args.size, args.size, 3), dtype=np.uint8))
    captions = ["true: automobile (wrong)\ntruck 61%\nautomobile 30%\nship 9%"] * args.pictures
    sides = {
        "tnflow (placed)": lambda: figures.picture_grid(images, captions, height=3.6),
        "constrained layout": lambda: constrained_grid(images, captions),
    }
    cpu(sides["tnflow (placed)"])  # matplotlib's first figure loads fonts: not either side's
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeat):
        for name, make in sides.items():
            runs[name].append(cpu(make))
    print(f"picture grid of {args.pictures} pictures at {args.size} px, PNG at 90 dpi; CPU s, medians of {args.repeat}")
    for name, values in runs.items():
        print(f"{name:20} {statistics.median(values):6.2f}")


if __name__ == "__main__":
    main()
