"""Batch-normalised backbones from random weights: validation accuracy with and without precise BN.

Each model trains from random weights (`--weights none`, BN trains) with the same budget, once
as tnflow trains it (BN's statistics re-estimated on training batches before each
validation, `tasks.tf.sessions.precise_bn`) and once with the moving averages alone (what
tnflow did before issue 28). `--data fake`: the tests' learnable CIFAR-format pictures (10
classes, chance 0.1); `--data sample`: two classes of the real CIFAR-10 sample (airplane,
frog; chance 0.5).

    python benchmarks/bench_bn_scratch.py --data fake --models mobilenet35v2 vgg16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tnflow.tasks.tf.sessions as sessions  # noqa: E402
from tests.fakes import make_archive  # noqa: E402
from tests.folders import extract_sample  # noqa: E402
from tnflow.tasks.cache.folder_cache import build_folder_cache  # noqa: E402
from tnflow.tasks.cache.stage import build_cache  # noqa: E402
from tnflow.tasks.config.specs import CacheSpec, FolderSpec, ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.training.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["fake", "sample"], default="fake")
    parser.add_argument("--models", nargs="+", default=["mobilenet35v2", "vgg16"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000, help="training pictures (sample: per class)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.data == "fake":
            _, md5 = make_archive(root / "a.tar.gz", n_train=args.images, n_test=200)
            cache = build_cache(root / "a.tar.gz", md5, CacheSpec("cifar10", 32, 200, None, None, 0), root / "cache")
        else:
            photos = extract_sample(root / "sample", classes=("airplane", "frog"), per_class=args.images)
            cache = build_folder_cache(photos, FolderSpec("folder", 32, 0.2, None, None, 0), root / "cache")
        classes = len(cache.class_names)
        settings = TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate, train_bn=True)
        print(f"{cache.counts} pictures at 32 px, chance {1 / classes:.2f}; {args.epochs} epochs, batch 32, Adam")
        print(f"{'model':15} {'BN statistics':22} {'train acc (last)':>16}  valid accuracy per epoch  seconds")
        precise = sessions.precise_bn
        for model in args.models:
            for label, estimate in (("precise BN", precise), ("moving averages", lambda *a, **k: 0)):
                sessions.precise_bn = estimate
                started = time.perf_counter()
                trained = train(
                    cache.path, None, ModelSpec(model, "gap", classes, 32), settings, root / model / label,
                    class_names=cache.class_names,
                )  # fmt: skip
                curve = " ".join(f"{r['valid_accuracy']:.3f}" for r in trained.history)
                last = trained.history[-1]["train_accuracy"]
                print(f"{model:15} {label:22} {last:16.3f}  {curve:24}  {time.perf_counter() - started:7.0f}")
                if model.startswith("vgg"):
                    break  # no BN: nothing to compare
        sessions.precise_bn = precise


if __name__ == "__main__":
    main()
