"""What training starts from: verified pretrained weights, or a trained model (`--init-from`).

A run starts from the ImageNet weights its backbone publishes (`--weights`, fetched and
checked against the graph), from a file or no weights at all, or from a trained model: a
model directory, or `champion`, this dataset's current champion (a scheduled retrain that
continues from the model in production). Which one it is, and how it was checked, goes into
the report and the model card; its digest goes into training's work directory, so a run
from other weights never resumes this one's epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from tnflow.tasks.cache.contents import dataset_key
from tnflow.tasks.core.cache_policy import StageCache
from tnflow.tasks.core.progress import STAGE_HOOKS, Progress, run_logger
from tnflow.tasks.sources.download import DOWNLOAD_RETRIES, source_identity
from tnflow.tasks.store.layout import champion_line, current_champion
from tnflow.tasks.tf.model_files import MODEL_JSON, check_can_start_from, model_digest
from tnflow.tasks.training.weights import WEIGHTS_CODE, WeightsFile, fetch_weights, weights_are_sound


@dataclass(frozen=True)
class StartingPoint:
    """Where training's weights come from: a checked weights file, nothing (random), or a trained model."""

    weights_path: str | None  # a checked weights file; None with `model_dir` or for a random start
    model_dir: str | None  # a trained model to continue from
    digest: str  # the weights' identity: the file's md5, `model:<digest>`, or `none`
    source: str  # where they came from, for the report and the model card
    md5: str | None
    check: str  # what they were checked against

    @property
    def origin(self) -> dict[str, Any]:
        return {"source": self.source, "md5": self.md5, "check": self.check}


def starting_model(init_from: str, output_dir: str | Path, cache_path: str | Path) -> Path | None:
    """The model directory `--init-from` names: `champion` is the champion of this dataset's line,
    None while there is none (a scheduled retrain's first run starts from --weights)."""
    if init_from != "champion":
        return Path(init_from).expanduser().absolute()
    current = current_champion(champion_line(output_dir, dataset_key(cache_path)))
    return current.resolve() if (current / MODEL_JSON).is_file() else None


def starting_point(
    *,
    init_from: str | None,
    weights: str,
    weights_md5: str | None,
    model: str,
    head: str,
    cache_path: str,
    class_names: list[str],
    output_dir: str,
    cache_dir: str,
    progress: Progress | None = None,
) -> StartingPoint:
    """The trained model `init_from` names (checked against this run), else the checked `weights`."""
    log = run_logger()
    path = starting_model(init_from, output_dir, cache_path) if init_from else None
    if init_from and path is None:
        log.warning("--init-from champion: this dataset has no champion yet; starting from --weights")
    if path is not None:
        check_can_start_from(path, model, head, class_names)
        digest = model_digest(path)
        log.info("training starts from %s (weights %s)", path, digest)
        check = "same backbone, head and classes"
        return StartingPoint(None, str(path), f"model:{digest}", f"the trained model {path}", None, check)
    found = fetch_weights(weights, weights_md5, model, head, cache_dir, progress=progress)
    if found.path:
        log.info("weights: %s, checked against %s", found.path, found.check)
    else:
        log.info("weights: none (random initialisation, as asked)")
    return StartingPoint(found.path, None, found.md5 or "none", found.source, found.md5, found.check)


# Where the cache and the runs are, and the class list, matter only to a trained model's start
# (`starting_point_identity` holds them then): a folder that grew keeps its checked weights.
FOR_A_MODEL_ONLY = ("cache_path", "class_names", "output_dir")


def starting_point_identity(inputs: dict[str, Any]) -> Any:
    """What the inputs only point at: the weights file, or the model (the champion changes between runs)."""
    if inputs["init_from"]:
        path = starting_model(inputs["init_from"], inputs["output_dir"], inputs["cache_path"])
        if path is not None:
            digest = model_digest(path) if (path / MODEL_JSON).is_file() else "missing"
            return str(path), digest, list(inputs["class_names"])
    return source_identity(inputs["weights"])  # no champion yet starts from the weights, as without --init-from


def starting_point_is_sound(point: StartingPoint) -> bool:
    """A recorded starting point is reusable while its file, or its model, is there unchanged."""
    if point.model_dir is not None:
        model = Path(point.model_dir)
        return (model / MODEL_JSON).is_file() and f"model:{model_digest(model)}" == point.digest
    return weights_are_sound(WeightsFile(point.weights_path, point.md5, point.source, point.check))


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="starting-point",
    cache_policy=StageCache(
        code=WEIGHTS_CODE, ignore=FOR_A_MODEL_ONLY, identity=starting_point_identity, sound=starting_point_is_sound
    ),
    persist_result=True,
    **DOWNLOAD_RETRIES,
    **STAGE_HOOKS,
)
def starting_point_task(
    *,
    init_from: str | None,
    weights: str,
    weights_md5: str | None,
    model: str,
    head: str,
    cache_path: str,
    class_names: list[str],
    output_dir: str,
    cache_dir: str,
) -> StartingPoint:
    progress = Progress(f"weights {Path(weights).name}", unit="B", logger=run_logger())
    point = starting_point(
        init_from=init_from,
        weights=weights,
        weights_md5=weights_md5,
        model=model,
        head=head,
        cache_path=cache_path,
        class_names=class_names,
        output_dir=output_dir,
        cache_dir=cache_dir,
        progress=progress,
    )
    progress.finish()
    return point
