"""Optuna: the same budget of trials on real pictures, with and without pruning.

Two `tnflow sweep --search optuna` runs of the same trials budget, seed and ranges on a
folder of real CIFAR-10 photos (../shared/data/cifar10-sample.tar.gz, 1,000 per class),
one with `--pruner none`, one with `--pruner median` (or `--pruners` to name others), each in
an output directory of its own (no training is shared) and with the cache built once before
either. For each: the trials pruned, the epochs trained, the training images seen (epochs x
the training split), the wall time, and the winner's validation and test accuracy, read from
the study and the sweep's own files.

    python benchmarks/bench_optuna.py --root /var/tmp/tnflow-optuna --trials 8 --epochs 4

Every model starts from random weights here (no pretrained file can be downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import optuna

from tnflow.tasks.cache.h5cache import read_split_size

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cifar10-sample.tar.gz"
TNFLOW = str(Path(sys.executable).with_name("tnflow"))


def folder(root: Path, sample: Path) -> Path:
    """The sample's pictures, unpacked once (members only under the target, as the archive stage does)."""
    target = root / "pictures"
    if not (target / "cifar10-sample").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sample) as archive:
            archive.extractall(target, filter="data")
    return target / "cifar10-sample"


def sweep(root: Path, data: Path, pruner: str, args: argparse.Namespace) -> dict:
    output = root / f"out-{pruner}"
    command = [TNFLOW, "sweep", "--search", "optuna", "--trials", str(args.trials), "--pruner", pruner]
    command += ["--vary", args.vary, "--parallel", "1", "--seed", str(args.seed)]
    command += ["--data-dir", str(data), "--limit-train", str(args.limit_train), "--valid-size", str(args.valid_size)]
    command += ["--test-size", str(args.test_size), "--model", args.model, "--image-size", str(args.image_size)]
    command += ["--head", "gap", "--weights", "none", "--epochs", str(args.epochs), "--export", "none"]
    command += ["--gpu-slot", "none", "--no-promote", "--cache-dir", str(root / "cache"), "--output-dir", str(output)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TNFLOW_LOCK_DIR": str(root)})
    seconds = time.monotonic() - started
    if done.returncode:
        sys.exit(f"the {pruner} sweep failed:\n{(done.stdout + done.stderr)[-3000:]}")
    sweep_dir = Path(done.stdout.strip().splitlines()[-1])
    database = f"sqlite:///{output / 'sweeps' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(database)
    trials = optuna.load_study(study_name=summary.study_name, storage=database).trials
    board = json.loads((sweep_dir / "leaderboard.json").read_text())
    winner = json.loads((sweep_dir / "decision.json").read_text())["winner"]
    (best,) = [row for row in board if row["name"] == winner]
    train_images = read_split_size(best["cache_path"], "train")  # every trial trains on the same split
    epochs = sum(len(t.intermediate_values) for t in trials)
    return {
        "pruner": pruner,
        "trials": len(trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "epochs_trained": epochs,
        "training_images": epochs * train_images,
        "wall_s": round(seconds, 1),
        "winner": f"{winner} ({_options(best['options'])})",
        "winner_valid_accuracy": best["valid_accuracy"],
        "winner_test_accuracy": best["test_accuracy"],
        "per_trial": [
            {"trial": t.number + 1, "state": t.state.name, "params": t.params, "valid": dict(t.intermediate_values)}
            for t in trials
        ],
    }


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/tnflow-optuna"))
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pruners", default="none,median")
    parser.add_argument("--vary", default="learning_rate,batch_size")
    parser.add_argument("--model", default="vgg19")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--limit-train", type=int, default=1500)
    parser.add_argument("--valid-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = folder(args.root, args.sample)
    results = [sweep(args.root, data, pruner, args) for pruner in args.pruners.split(",")]
    columns = ("pruner", "trials", "pruned", "epochs_trained", "training_images", "wall_s")
    columns += ("winner_valid_accuracy", "winner_test_accuracy", "winner")
    print(" | ".join(columns))
    for result in results:
        print(" | ".join(str(result[c]) for c in columns))
    print(json.dumps([r["per_trial"] for r in results]))


if __name__ == "__main__":
    main()
