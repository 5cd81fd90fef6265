"""Does transfer work, and which levers help? Measured on real pictures, on this CPU.

No ImageNet weights can be downloaded here, so this makes its own: it pretrains a backbone
from random weights on five classes of the real CIFAR-10 sample (airplane, automobile, bird,
cat, deer), exports that model as a weights file in exactly the format `--weights PATH`
reads for the backbone, and fine-tunes on the other five classes (dog, frog, horse, ship,
truck) from that file and from random weights with the same budget. Then an ablation on
the same transfer: the recipe's settings, each lever alone, and all of them together, with
test accuracy (held-out pictures of the five new classes) and wall time.

Everything runs through tnflow's own stages (folder cache, `train`, `evaluate_model`), without
Prefect around them. The fine-tune uses a small share of the target's training pictures
(`--target-train`), the situation transfer learning is for.

    python benchmarks/bench_transfer.py                  # the figures in benchmarks/README.md
    python benchmarks/bench_transfer.py --quick          # a smoke run in a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.fake_weights import write_weights  # noqa: E402
from tests.folders import sample_archive  # noqa: E402 - the real pictures, wherever the workplace keeps them
from tnflow.tasks.cache.folder_cache import build_folder_cache  # noqa: E402
from tnflow.tasks.config.backbones import BACKBONES  # noqa: E402
from tnflow.tasks.config.presets import PRESETS  # noqa: E402
from tnflow.tasks.config.specs import FolderSpec, ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.training.train import train  # noqa: E402
from tnflow.tasks.training.validate import evaluate_model  # noqa: E402

SOURCE = ("airplane", "automobile", "bird", "cat", "deer")
TARGET = ("dog", "frog", "horse", "ship", "truck")

# The ablation: the recipe (levers off), each lever alone, then together (`--preset strong`).
LEVERS: list[tuple[str, dict]] = [
    ("recipe", {}),
    ("augment flip-crop", {"augment": "flip-crop"}),
    ("label smoothing 0.1", {"label_smoothing": 0.1}),
    ("cosine, 1 warm-up epoch", {"lr_schedule": "cosine", "warmup_epochs": 1}),
    ("sgd momentum 0.9, decay 5e-4", {"optimizer": "sgd", "weight_decay": 5e-4, "lr_scale": 10}),
    ("freeze base 1 epoch", {"freeze_epochs": 1}),
    ("tta flip", {"tta": "flip"}),
    ("all (--preset strong)", dict(PRESETS["strong"])),
]


def class_folder(root: Path, name: str, classes: tuple[str, ...], pictures: Path) -> Path:
    """A folder dataset of some classes of the sample, as links (no copies)."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    for cls in classes:
        if not (folder / cls).exists():
            (folder / cls).symlink_to(pictures / cls, target_is_directory=True)
    return folder


def export_weights(model_dir: str, spec: ModelSpec, path: Path) -> None:
    """A trained model as the backbone's pretrained-weights file (what `--weights PATH` reads)."""
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.model_files import CHECKPOINT
    from tnflow.tasks.tf.sessions import open_session

    net = build(spec)
    with open_session(net) as session:
        net.model_saver.restore(session, str(Path(model_dir) / CHECKPOINT))
        variables = net.pretrained + net.head  # in weight-file order
        arrays = list(zip([v.op.name for v in variables], session.run(variables), strict=True))
        write_weights(path, BACKBONES[spec.model].weights_format, arrays)


def fine_tune(cache, weights: str | None, model: str, size: int, base: TrainSettings, levers: dict, work: Path):
    levers = dict(levers)
    scale = levers.pop("lr_scale", 1)
    tta = levers.pop("tta", "none")
    settings = dataclasses.replace(base, **levers, learning_rate=base.learning_rate * scale)
    if weights is None:
        settings = dataclasses.replace(settings, train_bn=True)  # no statistics to keep
    spec = ModelSpec(model, "gap", len(TARGET), size, tta)
    started = time.monotonic()
    trained = train(cache.path, weights, spec, settings, work, class_names=cache.class_names)
    test = evaluate_model(trained.model_dir, cache.path, "test", 256)
    return test["test_accuracy"], time.monotonic() - started, trained.best_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet35v2", choices=list(BACKBONES))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (every row's budget)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of every fine-tune")
    parser.add_argument("--target-train", type=int, default=1000, help="target training pictures (of 3,200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep caches and models here (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="3 pretraining epochs, 2 fine-tuning, no ablation")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_epochs, args.epochs = 3, 2

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        pictures = work / "cifar10-sample"
        if not pictures.is_dir():
            with tarfile.open(sample_archive()) as archive:
                archive.extractall(work, filter="data")
        cache_dir = work / "cache"
        spec = FolderSpec("folder", args.size, 0.1, None, None, args.seed, test_size=0.2)
        source = build_folder_cache(class_folder(work, "source", SOURCE, pictures), spec, cache_dir)
        target_spec = dataclasses.replace(spec, limit_train=args.target_train)
        target = build_folder_cache(class_folder(work, "target", TARGET, pictures), target_spec, cache_dir)

        print(
            f"{args.model} at {args.size}px; pretraining on {', '.join(SOURCE)} ({dict(source.counts)}); "
            f"fine-tuning on {', '.join(TARGET)} ({dict(target.counts)}), {args.epochs} epochs each",
            flush=True,
        )
        started = time.monotonic()
        pretrain = TrainSettings(
            epochs=args.pretrain_epochs,
            learning_rate=args.lr,
            seed=args.seed,
            augment="flip-crop",
            lr_schedule="cosine",
            train_bn=True,
        )
        source_spec = ModelSpec(args.model, "gap", len(SOURCE), args.size)
        pretrained = train(source.path, None, source_spec, pretrain, work / "pretrain", class_names=source.class_names)
        weights = work / f"pretrained-{args.model}.{'h5' if BACKBONES[args.model].weights_format == 'keras' else 'npz'}"
        export_weights(pretrained.model_dir, source_spec, weights)
        print(
            f"pretrained from random weights: valid accuracy {pretrained.valid_accuracy:.3f} on the source "
            f"classes in {time.monotonic() - started:.0f} s; exported to {weights.name}",
            flush=True,
        )

        base = TrainSettings(epochs=args.epochs, learning_rate=args.lr, seed=args.seed)
        rows = [("recipe, --weights none (scratch)", None, {}), ("recipe, --weights <pretrained file>", weights, {})]
        if not args.quick:
            rows += [(name, weights, levers) for name, levers in LEVERS[1:]]
        print(f"\n| fine-tune on {', '.join(TARGET)} | test accuracy | best epoch | wall time |")
        print("|---|---:|---:|---:|")
        results = {}
        for i, (name, path, levers) in enumerate(rows):
            accuracy, seconds, best = fine_tune(
                target, str(path) if path else None, args.model, args.size, base, levers, work / f"run-{i}"
            )
            results[name] = accuracy
            print(f"| {name} | {accuracy:.3f} | {best} | {seconds:.0f} s |", flush=True)
        scratch_accuracy, transfer_accuracy = list(results.values())[:2]
        verdict = "beats" if transfer_accuracy > scratch_accuracy else "does NOT beat"
        print(
            f"\ntransfer {transfer_accuracy:.3f} {verdict} scratch {scratch_accuracy:.3f} on "
            f"{target.counts['test']} held-out test pictures of the new classes"
        )


if __name__ == "__main__":
    main()
