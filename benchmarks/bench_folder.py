"""Folder cache build speed and memory: tnflow next to a Pillow + scikit-image loop and Keras.

Generates folders of photo-like JPEGs (quality 90: smooth gradients, shapes and noise, so
they compress like photos) at two sizes, 500x375 (a web photo) and 4032x3024 (a phone
photo), and builds each at 224 with:
  tnflow       `build_folder_cache`: scan, digest, split, decode (draft mode) on all cores, write HDF5
  loop         per image: Pillow open + convert, centre crop, `skimage.transform.resize` (anti-aliased),
               on a tenth of the images (its rate does not depend on how many)
  keras        `keras.utils.image_dataset_from_directory(crop_to_aspect_ratio=True)` iterated to the end,
               bilinear (its default) and `interpolation="area"` (tnflow's kernel: the ratio's peer)
and, where tnflow's build spends its time, each part of it alone on the same folder (the cause
of the gap to Keras, with its share of the build's time):
  digests      the scan: every file read and sha256'd (what makes the next build incremental)
  decoding     the same decoding workers over the same files, the pixels brought back to the caller
  writes       as many pictures written to a cache file (`CacheWriter`) from memory
Each runs in its own child process, so peak RSS (ru_maxrss, children included for tnflow's
workers) is its own. The folder is read once before timing, so every method reads from the
page cache.

    python benchmarks/bench_folder.py --images 400 --phone-images 60
    python benchmarks/bench_folder.py --scan-files 100000     # the unchanged-folder check only

`--scan-files N` times the scan a re-run does before anything else: N small files, scanned
the first time (every file read and digested) and again (the stat index: no file read), next
to a bare `os.walk` + `stat` of the same tree, the least any check of the folder can cost.
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

import numpy as np
from PIL import Image, ImageDraw

CLASSES = 4


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Gradients, a few shapes and sensor-like noise: compresses like a photo, not like a flat colour."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    image = base + xx[..., None] / width * tilt[0] + yy[..., None] / height * tilt[1]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(6):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.25) * width
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(canvas).astype(np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_photos(root: Path, n: int, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class-{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(width, height, rng).save(folder / f"photo-{i:05d}.jpg", quality=90)
    return root


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest child): tnflow's decoding workers are children."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, children / 1024


def run_tnflow(root: str, size: int, out: str) -> dict:
    from tnflow.tasks.cache.folder_cache import build_folder_cache
    from tnflow.tasks.config.options import DataConfig

    spec = DataConfig.from_values({"data_dir": root, "image_size": size, "valid_size": 0.1}).cache_spec()
    start = time.perf_counter()
    info = build_folder_cache(root, spec, out)
    return {"images": sum(info.counts.values()), "seconds": time.perf_counter() - start}


def run_loop(root: str, size: int, out: str) -> dict:
    from skimage.transform import resize

    start = time.perf_counter()
    count = 0
    for path in files(Path(root))[: int(os.environ.get("LOOP_IMAGES", "0")) or None]:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        h, w = pixels.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = pixels[top : top + side, left : left + side]
        resized = resize(square, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.uint8)
        count += resized.shape[0] > 0
    return {"images": count, "seconds": time.perf_counter() - start}


def run_keras(root: str, size: int, out: str, interpolation: str = "bilinear") -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    start = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        root, image_size=(size, size), crop_to_aspect_ratio=True, batch_size=32, shuffle=False, verbose=False,
        interpolation=interpolation,
    )  # fmt: skip
    count = sum(int(images.shape[0]) for images, _ in dataset)
    return {"images": count, "seconds": time.perf_counter() - start}


def run_keras_area(root: str, size: int, out: str) -> dict:
    return run_keras(root, size, out, interpolation="area")


def part_digests(root: str, size: int, out: str) -> dict:
    from tnflow.tasks.sources.folder import scan_folder

    start = time.perf_counter()
    scan = scan_folder(root, None)  # no stat index: every file read, as a first build does
    return {"images": len(scan.entries), "seconds": time.perf_counter() - start}


def part_decoding(root: str, size: int, out: str) -> dict:
    from tnflow.tasks.config.options import DataConfig
    from tnflow.tasks.sources.decode import decoder

    spec = DataConfig.from_values({"data_dir": root, "image_size": size, "valid_size": 0.1}).cache_spec()
    paths = [str(p) for p in files(Path(root))]
    start = time.perf_counter()
    with decoder() as pool:  # the build's workers, as the build starts them
        jobs = [paths[i : i + pool.job_images] for i in range(0, len(paths), pool.job_images)]
        count = sum(len(images) for images, _ in pool.map(jobs, size, spec.resize, spec.max_pixels))
    return {"images": count, "seconds": time.perf_counter() - start}


def part_writes(root: str, size: int, out: str) -> dict:
    from tnflow.tasks.cache.h5cache import CacheWriter

    count = len(files(Path(root)))
    block = np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    writer = CacheWriter(Path(out) / "writes.h5", {"dataset": "bench"}, size)
    for row in range(0, count, 32):
        n = min(32, count - row)
        writer.append(
            "train", block[:n], [0] * n, [f"{row + i:064x}" for i in range(n)], [f"{row + i}.jpg" for i in range(n)]
        )
    writer.finish({}, {}, "bench")
    return {"images": count, "seconds": time.perf_counter() - start}


PEER = "keras, interpolation='area'"  # like for like: tnflow shrinks by area too
METHODS = {
    "tnflow build_folder_cache": run_tnflow,
    "Pillow + skimage resize loop": run_loop,
    "keras image_dataset_from_directory": run_keras,
    PEER: run_keras_area,
}
PARTS = {"part: digests (scan)": part_digests, "part: decoding": part_decoding, "part: writes": part_writes}
BUILD = "tnflow build_folder_cache"


def child(method: str, root: str, size: int, out: str) -> None:
    result = {**METHODS, **PARTS}[method](root, size, out)
    own, worker = peak_rss_mb()
    print(json.dumps({**result, "peak_rss_mb": own, "worker_rss_mb": worker}))


def measure(method: str, root: Path, size: int, scratch: Path, loop_images: int) -> dict:
    out = tempfile.mkdtemp(dir=scratch)
    command = [sys.executable, __file__, "--child", method, str(root), str(size), out]
    env = {**os.environ, "LOOP_IMAGES": str(loop_images)}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_scan(n: int, scratch: Path) -> None:
    from tnflow.tasks.sources.folder import scan_folder

    root = scratch / "many"
    blob = bytes(2000)  # small files: the scan's cost is per file, not per byte
    for i in range(n):
        folder = root / f"class-{i % CLASSES}"
        if i < CLASSES:
            folder.mkdir(parents=True)
        (folder / f"{i:07d}.jpg").write_bytes(blob + i.to_bytes(4, "little"))
    index = scratch / "index.json"
    rows = []
    start = time.perf_counter()
    walked = sum(len([os.stat(os.path.join(d, f)) for f in fs]) for d, _, fs in os.walk(root))
    rows.append(("os.walk + stat (the floor)", walked, time.perf_counter() - start))
    for label in ("tnflow scan, first (reads every file)", "tnflow scan, unchanged (stat index)"):
        start = time.perf_counter()
        scan = scan_folder(root, index)
        rows.append((label, len(scan.entries), time.perf_counter() - start))
    print(f"\nscanning a folder of {n} files on {os.cpu_count()} cores")
    print(f"{'method':40} {'files':>8} {'seconds':>8}")
    for label, files_seen, seconds in rows:
        print(f"{label:40} {files_seen:8d} {seconds:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="web photos (500x375)")
    parser.add_argument("--phone-images", type=int, default=60, help="phone photos (4032x3024)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--scan-files", type=int, help="only time scanning a folder of this many files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-folder-") as scratch:
        scratch = Path(scratch)
        if args.scan_files:
            bench_scan(args.scan_files, scratch)
            return
        for label, n, (width, height) in (
            ("web photos 500x375", args.images, (500, 375)),
            ("phone photos 4032x3024", args.phone_images, (4032, 3024)),
        ):
            if n == 0:
                continue
            root = scratch / label.split()[0]
            # In a child process: a parent's peak RSS would be inherited by every method's child.
            subprocess.run([sys.executable, __file__, "--make", str(root), str(n), str(width), str(height)], check=True)
            for path in files(root):  # into the page cache, for every method alike
                path.read_bytes()
            print(f"\n{label}: {n} JPEGs (quality 90), built at {args.size}x{args.size} on {os.cpu_count()} cores")
            print(f"{'method':38} {'images':>7} {'img/s':>8} {'x area':>8} {'peak RSS MB':>12} {'worker MB':>10}")
            loop_images = max(10, n // 10)  # the loop is slow; its rate does not depend on the count
            results = {m: measure(m, root, args.size, scratch, loop_images) for m in METHODS}
            keras_rate = results[PEER]["images"] / results[PEER]["seconds"]
            for method, r in results.items():
                rate = r["images"] / r["seconds"]
                worker = f"{r['worker_rss_mb']:10.0f}" if r["worker_rss_mb"] else f"{'-':>10}"
                ratio, rss = rate / keras_rate, r["peak_rss_mb"]
                print(f"{method:38} {r['images']:7d} {rate:8.1f} {ratio:8.2f} {rss:12.0f} {worker}")
            build = results[BUILD]["seconds"]
            print(f"\ntnflow's build, {build:.2f} s, and each of its parts alone (they overlap in the build)")
            print(f"{'part':38} {'seconds':>8} {'x build':>8}")
            for part in PARTS:
                seconds = measure(part, root, args.size, scratch, loop_images)["seconds"]
                print(f"{part:38} {seconds:8.2f} {seconds / build:8.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "--make":
        make_photos(Path(sys.argv[2]), *(int(a) for a in sys.argv[3:6]))
    else:
        main()
