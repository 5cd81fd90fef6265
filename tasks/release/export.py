"""The export stage: a model's exports, made once and checked, and the run's model directory.

A tnflow model directory needs tnflow and tensornets to run. An export needs only its
runtime, and carries the preprocessing inside, so no serving stack re-implements it
(`tasks/tf/converters.py` writes and checks each format):

    saved_model/          TensorFlow Serving's format; signatures `serving_default` (uint8 RGB
                          (N, S, S, 3) -> probabilities, classes, top_class) and `serving_bytes`
                          (encoded JPEG/PNG/GIF/BMP (N,) -> the same, decoded and squared as the
                          cache did: `tasks/tf/decode_graph.py`)
    model.onnx            uint8 RGB -> probabilities (ONNX Runtime); the `onnx` extra
    model.tflite          the same in float32; model.float16.tflite with float16 weights
    labels.txt            the class names, one per line, in the order of the probabilities

Exports of a trained model are made once and shared by every run that reaches the same model
(`exports_of`): under one lock per directory, each file is written to a temporary name and
renamed when its check passed, so a killed export leaves nothing that looks finished. A run's
`model/` is the trained model, its exports (hard links) and its model card, put in place in
one rename before the champion gate, which links the whole directory into a new champion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.core.files import (
    exclusive,
    full_disk_ends,
    link_or_copy,
    link_tree,
    new_directory,
    remove_stale_temps,
    renamed_when_complete,
    write_atomic,
)
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.release.data_summary import data_sections
from tnflow.tasks.release.drift import reference_of
from tnflow.tasks.release.model_card import card_data, write_card
from tnflow.tasks.store.layout import run_model_dir, shared_exports_dir
from tnflow.tasks.tf.converters import FILES, WRITERS, Source
from tnflow.tasks.tf.model_files import model_digest, read_model_dir, update_model_json
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.validate import Validation

LABELS = "labels.txt"


def export(model_dir: str | Path, formats: tuple[str, ...], target: str | Path | None = None) -> dict[str, Any]:
    """Write `formats` of the model in `model_dir` into `target` (default: the model directory itself).

    Returns what each check found ({format: {"file", "max_difference", ...}}), which the model
    card records. The SavedModel is made first when another format needs it.
    """
    model_dir = Path(model_dir)
    target = Path(target) if target is not None else model_dir
    meta = read_model_dir(model_dir)
    needed = ("savedmodel", *formats) if formats and "savedmodel" not in formats else formats
    source = Source(model_dir, meta, target / FILES["savedmodel"])
    exporting = full_disk_ends("exporting the model", target)
    with exclusive(target / ".exports"), exporting:  # a second run exporting the same model waits, then finds them
        for fmt in needed:
            final = target / FILES[fmt]
            remove_stale_temps(final)
            if final.exists():
                continue
            with renamed_when_complete(final, "exporting the model") as tmp:
                _record_check(target, fmt, WRITERS[fmt](source, tmp))
        write_atomic(target / LABELS, "".join(f"{name}\n" for name in meta.class_names))
        return {fmt: _read_check(target, fmt) for fmt in formats}


def exports_of(model_dir: str | Path, formats: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """The shared exports of a trained model: beside it, named by its digest, made at most once."""
    model_dir = Path(model_dir)
    shared = shared_exports_dir(model_dir, model_digest(model_dir))
    shared.mkdir(exist_ok=True)
    return shared, export(model_dir, formats, shared)


def _record_check(target: Path, fmt: str, check: dict[str, Any]) -> None:
    path = target / "exports.json"
    checks = json.loads(path.read_text()) if path.is_file() else {}
    checks[fmt] = check
    write_atomic(path, json.dumps(checks, indent=2))


def _read_check(target: Path, fmt: str) -> dict[str, Any]:
    path = target / "exports.json"
    checks = json.loads(path.read_text()) if path.is_file() else {}
    return checks.get(fmt, {"file": FILES[fmt]})


# -- the run's model directory ------------------------------------------------------------


def publish_model(
    model_dir: str | Path,
    run_dir: str | Path,
    formats: tuple[str, ...],
    card: dict[str, Any],
    reference: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """<run dir>/model: the trained model, its exports and its card, put in place in one rename."""
    shared, checks = exports_of(model_dir, formats) if formats else (None, {})
    final = run_model_dir(run_dir)
    with full_disk_ends("exporting the model", run_dir), new_directory(final) as tmp:  # hard links: no extra space
        link_tree(model_dir, tmp)
        for check in checks.values():
            source = shared / check["file"]
            if source.is_dir():
                link_tree(source, tmp / check["file"])
            else:
                link_or_copy(source, tmp / check["file"])
        if shared is not None:
            link_or_copy(shared / LABELS, tmp / LABELS)
        # `reference`: the test split's summary, which batch scoring measures drift against.
        update_model_json(tmp, {"card": {**card, "exports": checks}, "reference": reference})
        write_card(tmp)
    return final, checks


def export_into_model_dir(model_dir: str | Path, formats: tuple[str, ...]) -> dict[str, Any]:
    """`tnflow export`: the formats written into the model directory itself, and its card rendered again."""
    model_dir = Path(model_dir)
    checks = export(model_dir, formats)
    with exclusive(model_dir / ".card"):  # two exports at once must not lose each other's entry
        card = read_model_dir(model_dir).card
        update_model_json(model_dir, {"card": {**card, "exports": {**card.get("exports", {}), **checks}}})
        write_card(model_dir)
    return checks


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="export",
    cache_policy=NO_CACHE,  # writes this run's model directory; the exports themselves are made once
    **STAGE_RETRIES,
    **STAGE_HOOKS,
)
def export_task(
    *,
    model_dir: str,
    run_dir: str,
    cache_path: str,
    formats: tuple[str, ...],
    start: StartingPoint,
    test: Validation,
) -> str:
    """<run dir>/model with the exports asked for and the model card (from the `test` validation); returns its path."""
    logger = run_logger()
    card = card_data(
        read_model_dir(model_dir), test.read_figures(), cache_path, data_sections(cache_path), start.origin
    )
    reference = reference_of(test.read_probabilities("test"))
    final, checks = publish_model(model_dir, run_dir, formats, card, reference)
    for fmt, check in checks.items():
        logger.info("exported %s", describe(fmt, check, final))
    return str(final)


def describe(fmt: str, check: dict[str, Any], directory: Path) -> str:
    """One line per export for the log and the CLI: where it is and how far it is from the SavedModel."""
    difference = check.get("max_difference")
    note = "" if difference is None else f" (max probability difference {difference:.1e} from the SavedModel)"
    return f"{fmt}: {directory / check['file']}{note}"
