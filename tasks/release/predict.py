"""Predictions for your own pictures from a saved model (a run's model/ or the champion).

Images are decoded by `tasks.sources.images` (any mode, 16-bit included), resized by the kernel the
cache uses for CIFAR-sized images (anti-aliased bilinear for larger photos), and scored in
batches of `batch_size`, so a folder of photos never has to fit in memory at once. One bad
image is reported and the rest still run. Batch scoring (`tnflow predict --out`, the
batch-predict flow) walks folders recursively and writes one CSV row per file, the reason
included for files it could not read.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tnflow.tasks.config.specs import ModelSpec
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import ensure_writable_dir, exclusive, renamed_when_complete, shown_name, write_atomic
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.release.drift import drift_rows, shares, uncertainty
from tnflow.tasks.sources.images import ImageError, load_square
from tnflow.tasks.store.layout import latest_champion, predictions_csv
from tnflow.tasks.tf.model_files import read_model_dir, restore_model

TOP_K = 3
BATCH_SIZE = 32
CSV_COLUMNS = ("path", "class", "probability", "margin", "entropy", "top3", "error")
TO_LABEL_COLUMNS = ("path", "class", "probability", "margin", "entropy")


def model_directory(model: str, output_dir: str | Path) -> Path:
    """The model `model` names, resolved now: `champion` stays the model it was when scoring began."""
    path = latest_champion(output_dir) if model == "champion" else Path(model).expanduser()
    if model == "champion" and not path.exists():
        raise TnflowError(f"there is no champion in {output_dir} yet; train one with `tnflow run`, or pass a model dir")
    read_model_dir(path)  # a clear error before TensorFlow starts
    return path.resolve()


def image_paths(sources: Iterable[str]) -> list[str]:
    """Each file as given, and every file under each folder (recursively, sorted, hidden ones skipped)."""
    paths: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                paths += [str(Path(root) / f) for f in sorted(files) if not f.startswith(".")]
        else:  # a file, or a name that is not there: reported with the other unreadable files
            paths.append(source)
    return paths


def files_to_score(sources: list[str], empty_ok: bool = False, missing_ok: bool = False) -> list[str]:
    """The files under `sources`, which must exist (`missing_ok`: a missing one is scored as unreadable).

    No file at all is an empty list where that is news (tonight's inbox was empty, `empty_ok`:
    a CSV with its header only), and an error where someone asked for these pictures.
    """
    for source in sources:
        if not missing_ok and not Path(source).exists():
            raise TnflowError(f"{source} does not exist; give image files or folders of them")
    paths = image_paths(sources)
    if not paths and not empty_ok:
        raise TnflowError(f"no files in {' '.join(sources)}; give image files, or folders that hold some")
    return paths


def load_image(path: str | Path, size: int, resize: str = "crop") -> np.ndarray:
    """uint8 RGB (size, size, 3) from an image file of any size and mode, squared as in training."""
    return load_square(path, size, resize)


def predict_files(
    model_dir: str | Path, paths: list[str], top: int = TOP_K, batch_size: int = BATCH_SIZE
) -> Iterator[dict[str, Any]]:
    """Per image, in order: {"image", "top": [{"class", "probability"}]} or {"image", "error"}.

    Close it (`contextlib.closing`) when the caller may stop early: its TensorFlow session is
    open while it is suspended, and one left to the interpreter's exit hangs it (the session's
    close starts a thread, which a finishing interpreter never runs).

    "image" is the path as outputs show it: a name that is not UTF-8 has its bytes escaped
    (`\\xff`), as the cache's records do, so CSVs, the console and artifacts can always write it.
    """
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import open_session, predict  # TensorFlow: only when predicting

    meta = read_model_dir(model_dir)
    spec = ModelSpec.from_meta(meta)
    names = meta.class_names
    net = build(spec, temperature=meta.temperature)  # calibrated probabilities
    with open_session(net) as session:
        restore_model(net.model_saver, session, model_dir)
        for start in range(0, len(paths), batch_size):
            results, loaded = [], []
            for path in paths[start : start + batch_size]:
                shown = shown_name(path)  # what every output says: valid UTF-8 whatever bytes the name has
                try:
                    loaded.append((len(results), load_image(path, spec.image_size, meta.resize)))
                    results.append({"image": shown})
                except (OSError, ImageError) as exc:
                    results.append({"image": shown, "error": f"cannot read {shown}: {shown_name(str(exc))}"})
            if loaded:
                probs = predict(session, net, np.stack([image for _, image in loaded]))
                for (index, _), row in zip(loaded, probs, strict=True):
                    best = np.argsort(-row)[:top]
                    results[index]["top"] = [{"class": names[c], "probability": float(row[c])} for c in best]
                    _, results[index]["margin"], results[index]["entropy"] = uncertainty(row)
            yield from results


def write_predictions(
    results: Iterable[dict[str, Any]], out: str | Path, seen: list[dict[str, Any]] | None = None
) -> Counter:
    """One CSV row per image (top-1 class, its probability, margin, entropy, the top 3; or the error).

    Returns the counts per class; `seen` collects the readable images' results, for what comes after.
    """
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise TnflowError(f"--out {out} is a directory; give the CSV's file name ({out / 'predictions.csv'})")
    ensure_writable_dir(out.parent, "--out")
    counts: Counter = Counter()
    with (
        exclusive(out),
        renamed_when_complete(out, stage="writing the --out CSV") as tmp,
        open(tmp, "w", newline="") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for result in results:
            if "error" in result:
                counts["(unreadable)"] += 1
                writer.writerow([result["image"], "", "", "", "", "", result["error"]])
                continue
            top = result["top"]
            counts[top[0]["class"]] += 1
            ranked = "; ".join(f"{t['class']} {t['probability']:.4f}" for t in top)
            writer.writerow([result["image"], top[0]["class"], *_uncertainty_cells(result), ranked, ""])
            if seen is not None:
                seen.append(result)
    return counts


def _uncertainty_cells(result: dict[str, Any]) -> list[str]:
    return [f"{result['top'][0]['probability']:.6f}", f"{result['margin']:.6f}", f"{result['entropy']:.6f}"]


def write_to_label(seen: list[dict[str, Any]], out: Path, count: int) -> Path:
    """The `count` least confident pictures, least first: the ones worth a human label next."""
    least = heapq.nsmallest(count, seen, key=lambda r: r["top"][0]["probability"])  # O(n log count), stable
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(TO_LABEL_COLUMNS)
    writer.writerows([r["image"], r["top"][0]["class"], *_uncertainty_cells(r)] for r in least)
    write_atomic(out, buffer.getvalue())
    return out


def score(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    batch_size: int = BATCH_SIZE,
    seen: list[dict[str, Any]] | None = None,
    empty_ok: bool = True,
) -> Counter:
    """Batch scoring: every picture under `sources` by the model in `model_dir`, into the CSV `out`."""
    paths = files_to_score(sources, empty_ok)
    with contextlib.closing(predict_files(model_dir, paths, batch_size=batch_size)) as results:
        return write_predictions(results, out, seen)


@dataclass(frozen=True)
class FolderScores:
    """A scored folder: its CSV, the pictures per class, the least confident ones to label, drift rows."""

    csv: Path
    counts: Counter
    to_label: Path | None
    drift: list[dict[str, Any]]  # against the model's test split; a row `flagged` when it moved

    @property
    def drifted(self) -> list[str]:
        return [row["statistic"] for row in self.drift if row["flagged"]]


def score_folder(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    batch_size: int = BATCH_SIZE,
    *,
    to_label: int = 100,
    empty_ok: bool = True,
) -> FolderScores:
    """Scoring a folder, the one way `tnflow predict --out` and the batch-predict flow do it: the CSV,
    `<csv>.to_label.csv` (the `to_label` least confident; none at 0), and the drift against the test split."""
    seen: list[dict[str, Any]] = []
    counts = score(model_dir, sources, out, batch_size, seen, empty_ok=empty_ok)
    csv_path = Path(out).expanduser().absolute()
    labelling = write_to_label(seen, csv_path.with_suffix(".to_label.csv"), to_label) if to_label else None
    return FolderScores(csv_path, counts, labelling, drift_of(model_dir, seen))


def drift_of(model_dir: str | Path, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scored pictures against the model's test split (its model.json `reference`); none without one."""
    meta = read_model_dir(model_dir)
    reference = meta.reference
    if not reference or not seen:
        return []
    index = {name: i for i, name in enumerate(meta.class_names)}
    classes = np.array([index[r["top"][0]["class"]] for r in seen])
    confidences = np.array([r["top"][0]["probability"] for r in seen])
    return drift_rows(shares(classes, confidences, len(index)), reference)


# -- Prefect ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Where a folder's predictions went, from which model, how many pictures each class got, and drift."""

    csv: str
    model: str
    counts: dict[str, int]
    to_label: str | None = None
    drifted: bool = False


DRIFT_EVENT = "tnflow.scoring.drift"


@task(
    name="score-folder",
    cache_policy=NO_CACHE,  # the folder and the champion change between runs
    **STAGE_RETRIES,
    **STAGE_HOOKS,
)
def score_folder_task(
    *, model: str, folder: str, output_dir: str, out: str | None, batch_size: int, to_label: int = 100
) -> Scored:
    """Score a folder into a CSV (default: <output dir>/predictions/<flow run name>.csv), list the least
    confident in <csv>.to_label.csv, and publish the class counts and the drift against the model's test split."""
    logger = run_logger()
    out = out or str(predictions_csv(output_dir, flow_run.name or "predictions"))
    model_dir = model_directory(model, output_dir)
    logger.info("scoring %s with %s", folder, model_dir)
    scores = score_folder(model_dir, [folder], out, batch_size, to_label=to_label)
    csv_path, counts, drift = scores.csv, scores.counts, scores.drift
    total = sum(counts.values())
    if not total:
        logger.warning("%s holds no files; the CSV has its header only", folder)
    create_table_artifact(
        table=[{"class": name, "images": n, "share": round(n / total, 4)} for name, n in counts.most_common()],
        key="tnflow-batch-predict",
        description=f"{total} files under {folder} scored by {model_dir}: [{csv_path.name}]({csv_path.as_uri()})",
    )
    if drift:
        create_table_artifact(
            table=drift,
            key="tnflow-scoring-drift",
            description=f"{total} files under {folder} against the test split of {model_dir}",
        )
    if scores.drifted:
        logger.warning("%s does not look like %s's test split: %s", folder, model_dir, ", ".join(scores.drifted))
        from prefect.events import emit_event

        emit_event(
            event=DRIFT_EVENT,
            resource={"prefect.resource.id": f"tnflow.model.{Path(model_dir).resolve().name}"},
            payload={"folder": folder, "csv": str(csv_path), "statistics": drift},
        )
    logger.info("%d files scored (%d unreadable); predictions in %s", total, counts["(unreadable)"], csv_path)
    labelling = str(scores.to_label) if scores.to_label else None
    return Scored(str(csv_path), str(model_dir), dict(counts), labelling, bool(scores.drifted))
