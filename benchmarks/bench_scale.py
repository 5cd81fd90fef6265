"""ImageNet's size: every per-picture stage at 1,281,167 pictures in 1,000 classes, beside one tenth of it.

Generates, once, a folder shaped like ImageNet's training set: small distinct JPEGs (24 to 72
pixels a side, varied aspect ratios, a few truncated ones) in 1,000 class folders under
`train/`, and a `val/` of 50,000 (the test split). Then measures, each step in a child process
of its own (peak RSS is the step's, its decoding workers included), at 32 px:

  prepare   `build_folder_cache`: the first build (scan, digest, split, decode, write)
  dask      the first build again on a local Dask cluster (two worker processes of one thread,
            `--dask-address`): its time beside `prepare`'s, the workers' decoding time, and whether
            its pictures, labels and digests are the first build's, byte for byte; then as many
            tasks that do nothing on the same cluster (Dask's own cost per task)
  rescan    the same build again, nothing changed (the stat index: no file read)
  grow      1% more pictures, then the build (incremental: only the new ones decoded)
  watch     `folder_changes` against a champion of the folder (what the watcher scans)
  review    the label review's screen on the test split, from constructed probabilities
  gate      the champion gate's comparison on the test split, from constructed predictions
  drift     the drift table of the test split's probabilities against a reference
  run       `tnflow run` on the folder: `--run-model` (MobileNetV2 0.35 by default; gap head, random
            weights) one epoch on `--limit-train` pictures (two a class), then validation, the label
            review and the report on the whole test and validation splits, at every class (the
            stages' own timings from metrics.json)
  report    that run's report written again from its metrics.json (the data summary read from the
            cache, the tables and figures at every class; the disputed pictures left out)
  predict   `tnflow predict MODEL val/ --out p.csv` with that run's model: every test picture scored
  peer      no tnflow code: a dict of the folder's paths built, probed and sent through JSON both
            ways, Python's own cost per item at each size (what the ratios above stand beside)
  write     no tnflow code: the first build's pixel bytes written to a new HDF5 file in whole
            chunks (h5py's direct chunk write) and closed, the disk's and page cache's own cost at
            each size (what `grow`, which copies every unchanged picture, stands beside)

Each figure is printed beside the same step on the folder at `--fraction` of the size (one
tenth by default), with the ratio: linear steps stay near 1/fraction (10x), and the issue's
bound is 12x.

    python benchmarks/bench_scale.py --root /var/tmp/tnflow-scale              # full size and a tenth
    python benchmarks/bench_scale.py --scale 0.01 --classes 100   # a quick look: 1% and 0.1%, 100 classes
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TRAIN, VAL, CLASSES = 1_281_167, 50_000, 1_000
CORRUPT_EVERY = 50_000  # one truncated file in this many
VALID_SIZE = 0.05  # every build's and the run's: one lineage, so the run's cache reuses the pixels
GROWN = 2  # the first digit of the pictures `grow` adds (train-2xxxxxxx.jpg)
STAGE_FIGURES = ("validate_s", "label-review_s")  # the run's stages, from its metrics.json
FIGURES = ("seconds", *STAGE_FIGURES, "peak_rss_mb", "worker_rss_mb", "images", "decoded", "pictures", "unreadable")
# Dask's:
FIGURES += ("speed_up", "overhead_s", "cluster_start_s", "compute_s", "empty_tasks_s", "busy_share", "same_bytes")
FIGURES += ("manifest_mb", "cache_mb", "csv_mb", "html_mb")  # printed side by side, where a step has them
# Steps that change nothing on disk, so `--repeat` may run them again: a second's figure at a
# tenth moves by a third between runs on a shared machine, more than the bound's 20% slack.
REPEATABLE = ("rescan", "watch", "review", "gate", "drift", "peer", "write")
STEPS = (
    "prepare",
    "dask",
    "rescan",
    "grow",
    "watch",
    "review",
    "gate",
    "drift",
    "run",
    "report",
    "predict",
    "peer",
    "write",
)


# -- the folder -----------------------------------------------------------------------------


def _class_name(index: int) -> str:
    return f"n{index:08d}"


def _picture(index: int) -> bytes:
    """A small distinct JPEG: a seeded 6x6 colour field, enlarged, with the index written in its first row."""
    from PIL import Image

    rng = np.random.default_rng(index)
    width, height = (int(v) for v in rng.integers(24, 73, 2))
    field = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(field).resize((width, height), Image.BILINEAR)).copy()
    bits = np.array([(index >> b) & 1 for b in range(min(21, width))], dtype=np.uint8) * 255
    pixels[0, : len(bits)] = bits[:, None]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    data = out.getvalue()
    return data[:100] if index % CORRUPT_EVERY == CORRUPT_EVERY - 1 else data


def _write_range(args: tuple[str, str, int, int, int, int]) -> int:
    root, split, start, stop, offset, classes = args
    for i in range(start, stop):
        folder = Path(root) / split / _class_name(i % classes)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}-{offset + i:07d}.jpg").write_bytes(_picture(offset + i))
    return stop - start


def write_pictures(root: Path, split: str, count: int, offset: int, classes: int, workers: int) -> None:
    chunk = 20_000
    jobs = [(str(root), split, s, min(s + chunk, count), offset, classes) for s in range(0, count, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_range, jobs))


def make_folder(root: Path, train: int, val: int, classes: int, workers: int) -> Path:
    """The folder, generated once: a marker names its size, and a folder of another size is made again."""
    marker = root / "made.json"
    wanted = {"train": train, "val": val, "classes": classes}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root / "data"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    write_pictures(root / "data", "train", train, 0, classes, workers)
    write_pictures(root / "data", "val", val, 10_000_000, classes, workers)
    marker.write_text(json.dumps(wanted))
    print(f"generated {train + val:,} pictures in {root / 'data'} in {time.perf_counter() - started:.0f} s", flush=True)
    return root / "data"


def grow_folder(data: Path, train: int, classes: int, workers: int) -> int:
    """1% more training pictures, as new files (named past every existing one)."""
    extra = max(1, train // 100)
    write_pictures(data, "train", extra, GROWN * 10_000_000, classes, workers)
    return extra


# -- the steps (each in a child process) -------------------------------------------------------


def _spec(data: Path):
    from tnflow.tasks.config.options import DataConfig

    return DataConfig.from_values({"data_dir": str(data), "image_size": 32, "valid_size": VALID_SIZE}).cache_spec()


def _build(work: Path) -> dict:
    from tnflow.tasks.cache.folder_cache import build_folder_cache
    from tnflow.tasks.cache.h5cache import read_manifest

    data = work / "data"
    started = time.perf_counter()
    info = build_folder_cache(data, _spec(data), work / "cache")
    seconds = time.perf_counter() - started
    (work / "cache.txt").write_text(info.path)
    images = sum(info.counts.values())
    summary = dict(info.summary)
    return {
        "seconds": seconds,
        "images": images,
        "rate": images / seconds,
        "decoded": summary.get("decoded", images),
        "cache_mb": Path(info.path).stat().st_size / 2**20,
        "manifest_mb": len(json.dumps(read_manifest(info.path))) / 2**20,
    }


def step_prepare(work: Path) -> dict:
    return _build(work)


def step_rescan(work: Path) -> dict:
    found = _build(work)
    del found["decoded"]  # the cache found is the first build's: its summary counts that build's decoding
    return found


def step_grow(work: Path) -> dict:
    return _build(work)


def step_watch(work: Path) -> dict:
    from datetime import UTC, datetime

    from tnflow.tasks.release.watch import folder_changes
    from tnflow.tasks.store.layout import champion_line, champion_record
    from tnflow.tasks.store.records import ChampionRecord, write_champion_file

    cache = (work / "first-cache.txt").read_text()
    line = champion_line(work / "runs", "folder-scale")
    record = champion_record(line / "current")
    record.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat()
    write_champion_file(record, ChampionRecord(run_id="scale", test_accuracy=0.5, cache=cache, promoted_at=now))
    started = time.perf_counter()
    changes = folder_changes(work / "data", work / "cache", work / "runs")
    return {"seconds": time.perf_counter() - started, "new": changes.new, "known": changes.known}


def _test_split(work: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(labels, constructed probabilities, file paths, class names) of the cache's test split.

    Also imports scipy.stats, which the review and the gate import at their first test: the
    clock times the steps' work, not a one-off import of a second or two.
    """
    import scipy.stats  # noqa: F401

    from tnflow.tasks.cache.contents import read_class_names, read_files
    from tnflow.tasks.cache.h5cache import read_labels

    cache = (work / "cache.txt").read_text()
    labels, names = read_labels(cache, "test"), read_class_names(cache)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(len(names), 0.05), len(labels)).astype(np.float32)
    right = rng.random(len(labels)) < 0.7  # a model 70% right: its label gets most of the mass
    probs[right] *= 0.3
    probs[right, labels[right]] += 0.7
    return labels, probs, read_files(cache, "test"), names


def step_review(work: Path) -> dict:
    from tnflow.tasks.release.review import ranked, screen

    labels, probs, paths, names = _test_split(work)
    started = time.perf_counter()
    rows, why = screen(probs, labels, split="test", paths=paths, class_names=names)
    ranked(rows)
    return {"seconds": time.perf_counter() - started, "pictures": len(labels), "disputed": len(rows), "why": why}


def step_gate(work: Path) -> dict:
    from tnflow.tasks.release.significance import compare, detectable_gain

    labels, probs, _, names = _test_split(work)
    candidate = probs.argmax(axis=1)
    champion = np.where(np.random.default_rng(1).random(len(labels)) < 0.9, candidate, (candidate + 1) % len(names))
    started = time.perf_counter()
    found = compare(candidate, champion, labels, names)
    detectable_gain(len(labels), found.only_candidate + found.only_champion, 0.05)
    return {"seconds": time.perf_counter() - started, "pictures": len(labels), "p": found.p_value}


def step_drift(work: Path) -> dict:
    from tnflow.tasks.release.drift import drift_rows, reference_of

    _, probs, _, _ = _test_split(work)
    started = time.perf_counter()
    reference = reference_of(probs[: len(probs) // 2])
    drift_rows(reference_of(probs[len(probs) // 2 :]), reference)
    return {"seconds": time.perf_counter() - started, "pictures": len(probs)}


def step_peer(work: Path) -> dict:
    """Python's own cost per picture at this size: what no tnflow code is in, for the ratios beside it.

    A dict of as many relative paths as the folder's first build saw, each to [size, mtime,
    digest] as the stat index holds them, built, probed once per path in the folder's order,
    and sent through JSON both ways (the stat index's and the manifest's round trip).
    """
    count = json.loads((work / "prepare.json").read_text())["images"]
    paths = [f"train/{_class_name(i % CLASSES)}/train-{i:08d}.jpg" for i in range(count)]
    started = time.perf_counter()
    index = {path: [i, i * 7919, f"{i:064x}"] for i, path in enumerate(paths)}
    found = sum(1 for path in paths if path in index)
    again = json.loads(json.dumps(index))
    return {"seconds": time.perf_counter() - started, "pictures": found + len(again) - count}


def step_write(work: Path) -> dict:
    """The page cache's own cost per byte at this size: as many 32 px pictures as the first build's, written raw."""
    import h5py

    count = json.loads((work / "prepare.json").read_text())["images"]
    block = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8).tobytes()
    path = work / "write-peer.h5"
    started = time.perf_counter()
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (count, 32, 32, 3), np.uint8, chunks=(256, 32, 32, 3))
        for row in range(0, count - count % 256, 256):
            images.id.write_direct_chunk((row, 0, 0, 0), block)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    path.unlink()
    return {"seconds": seconds, "cache_mb": size / 2**20}


def _tnflow(*args: str, expected: str = "") -> tuple[float, str]:
    """A `tnflow` command as a user runs it (its peak RSS is the step's `worker_rss_mb`); wall time and output.

    `expected`: an error line the command may end with (and exit non-zero) without the step failing.
    """
    command = [str(Path(sys.executable).with_name("tnflow")), *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)  # the user's Prefect API, or a temporary server
    if done.returncode and not (expected and expected in done.stderr):
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def step_run(work: Path) -> dict:
    data = work / "data"
    classes = len([d for d in (data / "train").iterdir() if d.is_dir()])
    seconds, out = _tnflow(
        "run", "--data-dir", str(data), "--image-size", "32", "--valid-size", str(VALID_SIZE), "--limit-train",
        str(2 * classes), "--model", os.environ["BENCH_RUN_MODEL"], "--head", "gap", "--weights", "none",
        "--epochs", "1",
        "--export", "none", "--no-promote", "--cache-dir", str(work / "cache"), "--output-dir", str(work / "runs"),
    )  # fmt: skip
    run = Path(out.strip().splitlines()[-1])
    (work / "run.txt").write_text(str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    stages = {t["name"]: t["seconds"] for t in metrics["timings"]}
    shown = ("validate", "label-review")  # the report writes the timings: `report` times it
    return {"seconds": seconds, "pictures": metrics["num_test"]} | {f"{k}_s": stages[k] for k in shown if k in stages}


def step_report(work: Path) -> dict:
    from tnflow.tasks.release.data_summary import data_sections
    from tnflow.tasks.release.report import write_report

    run = Path((work / "run.txt").read_text())
    saved = json.loads((run / "metrics.json").read_text())
    figures = ("test_accuracy", "test_loss", "num_test", "class_names", "per_class_accuracy", "confusion_matrix")
    metrics = {k: saved[k] for k in (*figures, "samples", "calibration")}
    out = work / "report-again"
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    data = data_sections(saved["cache"])
    paths, _ = write_report(
        out, config=saved["config"], history=saved["history"], metrics=metrics, stages=saved["timings"],
        cache_path=saved["cache"], data=data, device=saved["device"], promotion=saved["promotion"],
    )  # fmt: skip
    seconds = time.perf_counter() - started
    sizes = {k: Path(v).stat().st_size / 2**20 for k, v in paths.items()}
    return {"seconds": seconds, "classes": len(metrics["class_names"]), "html_mb": sizes["html"]}


def step_predict(work: Path) -> dict:
    run = Path((work / "run.txt").read_text())
    out = work / "predictions.csv"
    # The folder holds one truncated file in CORRUPT_EVERY: predict scores the rest, lists it and exits 1.
    seconds, _ = _tnflow(
        "predict", str(run / "model"), str(work / "data" / "val"), "--out", str(out), expected="could not be read"
    )
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    unreadable = sum(1 for row in rows if row["error"])
    return {
        "seconds": seconds,
        "pictures": len(rows),
        "unreadable": unreadable,
        "rate": len(rows) / seconds,
        "csv_mb": out.stat().st_size / 2**20,
    }


def _nothing() -> None:
    return None


def _empty_tasks(client, count: int, in_flight: int) -> float:
    """Seconds for `count` tasks that do nothing, as many in flight as the build keeps: Dask's own cost."""
    from collections import deque

    pending: deque = deque()
    started = time.perf_counter()
    for _ in range(count):
        pending.append(client.submit(_nothing, pure=False))
        if len(pending) >= in_flight:
            pending.popleft().result()
    while pending:
        pending.popleft().result()
    return time.perf_counter() - started


def step_dask(work: Path) -> dict:
    """The first build on a two-worker Dask cluster on this machine, into a cache of its own."""
    import dask
    import h5py
    from distributed import Client, LocalCluster

    dask.config.set(distributed__scheduler__dashboard__tasks__task_stream_length=1_000_000)  # every task recorded

    from tnflow.tasks.cache.folder_cache import build_folder_cache
    from tnflow.tasks.sources.decode import IN_FLIGHT_PER_WORKER

    data, cache = work / "data", work / "cache-dask"
    if not (work / "prepare.json").is_file() or next(data.glob(f"train/*/train-{GROWN}*.jpg"), None):
        raise SystemExit("dask measures against the first build of the folder as generated: --steps prepare,dask")
    shutil.rmtree(cache, ignore_errors=True)  # no stat index: every file read, as the first build did
    started = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cluster_start = time.perf_counter() - started
        with Client(cluster) as client:
            client.get_task_stream()  # starts the scheduler's record of every task's compute time
            started = time.perf_counter()
            info = build_folder_cache(data, _spec(data), cache, dask_address=cluster.scheduler_address)
            seconds = time.perf_counter() - started
            stream = client.get_task_stream()
            empty = _empty_tasks(client, len(stream), IN_FLIGHT_PER_WORKER * 2)
    compute = sum(
        part["stop"] - part["start"] for task in stream for part in task["startstops"] if part["action"] == "compute"
    )
    first = (work / "first-cache.txt").read_text()
    with h5py.File(first, "r") as a, h5py.File(info.path, "r") as b:  # in slices: the caller's RSS stays the build's
        same = all(
            a[key].shape == b[key].shape
            and all(
                np.array_equal(a[key][i : i + 65_536], b[key][i : i + 65_536]) for i in range(0, len(a[key]), 65_536)
            )
            for key in (
                f"{split}/{name}" for split in ("train", "valid", "test") for name in ("images", "labels", "digests")
            )
        )
    shutil.rmtree(cache, ignore_errors=True)  # a second cache of the folder's size is not kept
    images = sum(info.counts.values())
    local = json.loads((work / "prepare.json").read_text())["seconds"]  # the same build on local processes
    return {
        "seconds": seconds,
        "speed_up": local / seconds,
        "overhead_s": seconds - local,
        "busy_share": compute / (2 * seconds),  # of the two workers' time, the share spent decoding
        "cluster_start_s": cluster_start,
        "compute_s": compute,
        "tasks": len(stream),
        "empty_tasks_s": empty,  # the same number of tasks doing nothing, on the same cluster after the build
        "images": images,
        "rate": images / seconds,
        "same_bytes": float(same),
    }


def child(step: str, work: str) -> None:
    result = globals()[f"step_{step}"](Path(work))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({**result, "peak_rss_mb": own, "worker_rss_mb": workers}))


def measure(step: str, work: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", step, str(work)], capture_output=True, text=True, env=os.environ
    )
    if done.returncode:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(
    root: Path, scale: float, classes: int, steps: list[str], workers: int, repeat: int = 1
) -> dict[str, dict]:
    train, val = round(TRAIN * scale), round(VAL * scale)
    if val < 2 * classes:
        raise SystemExit(
            f"--scale {scale:g} gives {val:,} test pictures for {classes:,} classes, fewer than two a class: "
            f"pass --classes {max(2, val // 2)} or fewer"
        )
    work = root / f"scale-{scale:g}-{classes}"
    data = make_folder(work, train, val, classes, workers)
    if "prepare" in steps:  # from the folder as generated, with nothing built
        for grown in data.glob(f"train/*/train-{GROWN}*.jpg"):  # an earlier run's 1%
            grown.unlink()
        shutil.rmtree(work / "cache", ignore_errors=True)  # its stat index too: the first build reads every file
        shutil.rmtree(work / "runs", ignore_errors=True)
    elif not (work / "first-cache.txt").is_file():
        raise SystemExit(f"{work} has no cache yet: run with --steps prepare first (the others measure against it)")
    results = {}
    for step in steps:
        if step == "grow":
            grow_folder(work / "data", train, classes, workers)
        results[step] = measure(step, work)
        if step in REPEATABLE and repeat > 1:  # the median run of `repeat`, each a fresh process
            runs = [results[step]] + [measure(step, work) for _ in range(repeat - 1)]
            results[step] = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
            results[step]["all_seconds"] = [round(r["seconds"], 3) for r in runs]
        if step == "prepare":
            (work / "first-cache.txt").write_text((work / "cache.txt").read_text())
            (work / "prepare.json").write_text(json.dumps(results[step]))
        print(f"  {scale:g}: {step} {json.dumps(results[step])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/tnflow-scale"))
    parser.add_argument("--scale", type=float, default=1.0, help="the large folder, as a share of ImageNet's size")
    parser.add_argument("--fraction", type=float, default=0.1, help="the small folder, as a share of the large one")
    parser.add_argument("--classes", type=int, default=CLASSES, help="fewer for a quick look at small scales")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument(
        "--run-model", default="mobilenet35v2", help="the run's backbone: its scoring speed is not what is measured"
    )
    parser.add_argument("--repeat", type=int, default=1, help=f"runs of each of {', '.join(REPEATABLE)}: the median")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating pictures")
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    os.environ["BENCH_RUN_MODEL"] = args.run_model  # the step's child process reads it
    small = run_size(args.root, args.scale * args.fraction, args.classes, steps, args.workers, args.repeat)
    large = run_size(args.root, args.scale, args.classes, steps, args.workers, args.repeat)
    print(f"\n{'step':<10}{'figure':<14}{'small':>14}{'large':>14}{'ratio':>8}")
    for step in steps:
        for key in FIGURES:
            if key in large[step]:
                a, b = small[step][key], large[step][key]
                ratio = f"{b / a:.1f}x" if a > 0 else "-"
                print(f"{step:<10}{key:<14}{a:>14,.1f}{b:>14,.1f}{ratio:>8}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
