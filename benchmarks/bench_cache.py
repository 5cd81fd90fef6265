"""Cache build speed and memory: tnflow's build_cache next to the recipe's resize loop.

Each method runs in its own child process on the same generated CIFAR-10-format archive, so
peak RSS (ru_maxrss) is that method's alone. tnflow is timed end to end (read the archive,
split, resize, write HDF5); the recipe only for its resize loop, which keeps every image as
a float64 array in a list, as the published notebook does.

    python benchmarks/bench_cache.py --images 3000 --size 224
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes import make_archive  # noqa: E402
from tnflow.tasks.cache.stage import build_cache  # noqa: E402
from tnflow.tasks.config.specs import CacheSpec  # noqa: E402
from tnflow.tasks.sources.cifar import read_archive  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tnflow(archive: str, md5: str, size: int, valid: int, workers: int, out_dir: str) -> dict:
    spec = CacheSpec("cifar10", size, valid, None, None, 0)
    base = peak_rss_mb()
    start = time.perf_counter()
    info = build_cache(archive, md5, spec, out_dir, workers=workers)
    seconds = time.perf_counter() - start
    images = sum(info.counts.values())
    return {"images": images, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base}


def run_recipe(archive: str, size: int, limit: int) -> dict:
    from skimage.transform import resize

    data = read_archive(archive, "cifar10")
    images = data.train_images[:limit]
    base = peak_rss_mb()
    start = time.perf_counter()
    resized = [resize(image, (size, size), mode="constant") for image in images]  # the recipe's line
    seconds = time.perf_counter() - start
    return {
        "images": len(resized),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": base,
        "bytes_per_image": resized[0].nbytes,
    }


def child(args: argparse.Namespace) -> None:
    if args.method == "recipe":
        result = run_recipe(args.archive, args.size, args.recipe_images)
    else:
        result = run_tnflow(args.archive, args.md5, args.size, args.valid, args.workers, args.out)
    print(json.dumps(result))


def measure(method: str, archive: Path, md5: str, args: argparse.Namespace, workers: int = 0) -> dict:
    with tempfile.TemporaryDirectory(dir=args.scratch) as out:
        command = [sys.executable, __file__, "--child", method, "--archive", str(archive), "--md5", md5]
        command += ["--size", str(args.size), "--valid", str(args.valid), "--workers", str(workers), "--out", out]
        command += ["--recipe-images", str(args.recipe_images)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="training images in the generated archive")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--recipe-images", type=int, default=500, help="images for the (slow) recipe loop")
    parser.add_argument("--scratch", default=None, help="directory for the archive and cache files")
    parser.add_argument("--child", choices=["tnflow", "recipe"], dest="method")
    parser.add_argument("--archive")
    parser.add_argument("--md5")
    parser.add_argument("--valid", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.method:
        child(args)
        return

    cores = os.cpu_count() or 1
    args.valid = args.valid or max(1, args.images // 10)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        archive = Path(scratch) / "cifar-10-python.tar.gz"
        _, md5 = make_archive(archive, n_train=args.images, n_test=max(10, args.images // 5))
        rows = [
            ("recipe: skimage resize loop, float64 list", measure("recipe", archive, md5, args)),
            ("tnflow build_cache, 1 worker", measure("tnflow", archive, md5, args, workers=1)),
            (f"tnflow build_cache, {cores} workers", measure("tnflow", archive, md5, args, workers=cores)),
        ]
    recipe_rate = rows[0][1]["images"] / rows[0][1]["seconds"]
    print(f"cache build at {args.size}x{args.size} on {cores} cores (archive: {args.images} train images)")
    print(f"{'method':44} {'images':>7} {'img/s':>9} {'x recipe':>9} {'peak RSS MB':>12}")
    for name, r in rows:
        rate = r["images"] / r["seconds"]
        print(f"{name:44} {r['images']:>7} {rate:>9.0f} {rate / recipe_rate:>9.1f} {r['peak_rss_mb']:>12.0f}")
    per_image = rows[0][1]["bytes_per_image"]
    print(f"recipe memory for all 60000 CIFAR-10 images: {60000 * per_image / 1e9:.0f} GB of float64 arrays")


if __name__ == "__main__":
    main()
