"""The label review on real pictures with planted errors: held-out splits, and the training split cross-fitted.

Two classes of the real CIFAR-10 sample (airplane and frog, `../shared/data`) in a folder with
train/, val/ and test/; 20 airplanes are filed under frog in the training folder and 20 more in
the held-out folders (10 in each). VGG16 trains from random weights (no pretrained weights can
be downloaded here). Then, side by side on the same pictures:

- held-out: the review of the validation and test splits by the trained model (what every run does);
- training, in-sample: the training split scored by that same model, which learned its labels,
  wrong ones included (what a review of the training split without cross-fitting would see);
- training, cross-fitted: `--review-train K`, each picture scored by the fold model that did not
  see it (`tasks.training.cross_fit`).

For each: how many pictures confident learning flags, and precision / recall of the planted
errors among them and among the first 40 rows; with cleanlab installed, cleanlab's own
`find_label_issues` (confident learning, ranked by normalised margin) on the same probabilities.

    python benchmarks/bench_review.py --per-class 400 --epochs 8 --folds 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.folders import extract_sample  # noqa: E402
from tnflow.tasks.cache.folder_cache import build_folder_cache  # noqa: E402
from tnflow.tasks.config.specs import FolderSpec, ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.release.review import label_issues  # noqa: E402
from tnflow.tasks.training.cross_fit import cross_fit  # noqa: E402
from tnflow.tasks.training.starting_point import StartingPoint  # noqa: E402
from tnflow.tasks.training.train import train  # noqa: E402
from tnflow.tasks.training.validate import evaluate_model, validate  # noqa: E402

TOP = 40


def planted_folder(root: Path, per_class: int, planted: int) -> tuple[Path, set[str]]:
    """train/ val/ test/ (60/20/20 of `per_class`) of airplane and frog; `planted` airplanes filed as frog
    in train/ and as many in val/ and test/ together. Returns the folder and the planted paths."""
    photos = extract_sample(root / "sample", classes=("airplane", "frog"), per_class=per_class)
    folder = root / "photos"
    shares = {"train": 0.6, "val": 0.2, "test": 0.2}
    wrong = set()
    for name in ("airplane", "frog"):
        files = sorted((photos / name).iterdir())
        start = 0
        for split, share in shares.items():
            count = round(per_class * share)
            target = folder / split / name
            target.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(files[start : start + count]):
                misfile = name == "airplane" and i < (planted if split == "train" else planted // 2)
                destination = folder / split / "frog" / f"planted-{path.name}" if misfile else target / path.name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, destination)
                if misfile:
                    wrong.add(str(destination.relative_to(folder)))
            start += count
    return folder, wrong


def figures(groups: list[tuple[np.ndarray, np.ndarray, list[str]]], wrong: set[str]) -> str:
    """Flagged count, precision / recall of the planted among the flagged and the first 40, in a row.

    `groups`: (probabilities, labels, paths) of each split, screened on its own and merged by
    normalised margin, as the review does.
    """
    flagged, same = [], []  # (margin, planted?) of every flagged picture; cleanlab's agreement per group
    total = 0
    for probs, labels, paths in groups:
        rows, margin = label_issues(probs, labels)
        flagged += [(margin[i], paths[i] in wrong) for i in rows]
        total += sum(p in wrong for p in paths)
        try:
            from cleanlab.filter import find_label_issues
        except ImportError:
            continue
        theirs = find_label_issues(
            labels, probs, filter_by="confident_learning", return_indices_ranked_by="normalized_margin"
        )
        same.append(np.array_equal(np.asarray(theirs), rows))
    flagged.sort(key=lambda row: row[0])
    hits, top = sum(p for _, p in flagged), sum(p for _, p in flagged[:TOP])
    line = (
        f"{total:7d} {len(flagged):7d} {hits / max(len(flagged), 1):9.2f} {hits / max(total, 1):6.2f}"
        f"  {top / max(min(TOP, len(flagged)), 1):9.2f} {top / max(total, 1):6.2f}"
    )
    if not same:
        return line + "   (cleanlab not installed)"
    return line + ("   cleanlab: the same rows" if all(same) else "   cleanlab: other rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=400, help="pictures per class (at most 1000)")
    parser.add_argument("--planted", type=int, default=20, help="misfiled in train/, and as many in val/ + test/")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--folds", type=int, default=3, help="0: the main model only")
    parser.add_argument("--model", default="vgg16", help="from random weights: a network without BN learns fastest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, wrong = planted_folder(root, args.per_class, args.planted)
        cache = build_folder_cache(folder, FolderSpec("folder", 32, 0.2, None, None, 0), root / "cache")
        spec = ModelSpec(args.model, "gap", 2, 32)
        settings = TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate)
        print(f"{cache.counts} pictures at 32 px; {args.model} from random weights, {args.epochs} epochs, Adam")
        started = time.perf_counter()
        trained = train(cache.path, None, spec, settings, root / "main", class_names=cache.class_names)
        metrics = validate(trained.model_dir, cache.path, "test", 256, root / "run").read_figures()
        curve = " ".join(f"{r['valid_accuracy']:.3f}" for r in trained.history)
        print(f"main model: valid accuracy per epoch {curve}; test {metrics['test_accuracy']:.3f} (given labels), "
              f"{time.perf_counter() - started:.0f} s")  # fmt: skip
        if not args.folds:
            return
        started = time.perf_counter()
        start = StartingPoint(None, None, "none", "random", None, "none")
        folds = cross_fit(cache.path, start, spec, settings, args.folds, output_dir=str(root / "out"),
                          run_dir=root / "run", class_names=cache.class_names, eval_batch_size=256)  # fmt: skip
        accuracies = " ".join(f"{a:.3f}" for a in folds.valid_accuracies)
        print(f"{args.folds} fold trainings: valid {accuracies}, {time.perf_counter() - started:.0f} s")

        with h5py.File(cache.path) as f:
            split_of = {
                s: (f[f"{s}/labels"][:], [p.decode() for p in f[f"{s}/paths"][:]]) for s in ("train", "valid", "test")
            }
        held = [(np.load(root / "run" / f"{s}_probabilities.npy"), *split_of[s]) for s in ("valid", "test")]
        labels, paths = split_of["train"]
        in_sample = evaluate_model(trained.model_dir, cache.path, "train", 256)["probs"]
        print(f"\n{'review':28} {'planted':>7} {'flagged':>7} {'precision':>9} {'recall':>6}  "
              f"{'prec@' + str(TOP):>9} {'rec@' + str(TOP):>6}")  # fmt: skip
        print(f"{'held-out (valid + test)':28} {figures(held, wrong)}")
        print(f"{'training, in-sample':28} {figures([(in_sample, labels, paths)], wrong)}")
        crossed = figures([(np.load(folds.probabilities), labels, paths)], wrong)
        print(f"{f'training, cross-fitted (K={args.folds})':28} {crossed}")


if __name__ == "__main__":
    main()
