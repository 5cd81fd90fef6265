"""The options of the commands that use a trained model: scoring a folder, and watching one for change.

Declared as the run's options are (`tasks.config.options`): pydantic fields that the CLI, the
flows and their deployments share.
"""

from __future__ import annotations

from pydantic import Field

from tnflow.tasks.config.datasets import default_cache_dir, default_output_dir
from tnflow.tasks.config.parameters import Configuration


class ScoreConfig(Configuration):
    """Batch scoring (`tnflow predict --out`, the batch-predict flow and its deployment)."""

    folder: str = Field(description="a folder of pictures (read recursively) or one picture")
    model: str = Field(
        "champion",
        description="a model directory (a run's model/), or champion for the latest promoted model",
        json_schema_extra={"metavar": "DIR"},
    )
    output_dir: str = Field(
        default_factory=default_output_dir,
        description="where champion is looked up and predictions are written (default: $TNFLOW_OUTPUT_DIR or ./runs)",
        json_schema_extra={"metavar": "DIR"},
    )
    out: str | None = Field(
        None,
        description="the CSV to write (default: <output dir>/predictions/<run name>.csv)",
        json_schema_extra={"metavar": "CSV"},
    )
    batch_size: int = Field(32, ge=1, le=4096, description="images scored at once")
    to_label: int = Field(
        100,
        ge=0,
        description="list the N least confident pictures in <csv>.to_label.csv, worth labelling next (0: none)",
        json_schema_extra={"metavar": "N"},
    )


class WatchConfig(Configuration):
    """The folder watcher (the watch-folder flow and its `watch` deployment)."""

    data_dir: str = Field(description="the image folder to watch (as --data-dir of its runs)")
    min_new: float = Field(
        0.05,
        gt=0,
        allow_inf_nan=False,
        description="announce a change once at least this many pictures are new, changed or removed: a count, "
        "or a fraction (below 1) of the pictures the champion was trained on",
        json_schema_extra={"metavar": "N|X"},
    )
    cache_dir: str = Field(
        default_factory=default_cache_dir,
        description="where the folder's stat index lives, as for its runs (default: $TNFLOW_CACHE_DIR or "
        "~/.cache/tnflow)",
        json_schema_extra={"metavar": "DIR"},
    )
    output_dir: str = Field(
        default_factory=default_output_dir,
        description="where the champion is, and what was announced (default: $TNFLOW_OUTPUT_DIR or ./runs)",
        json_schema_extra={"metavar": "DIR"},
    )
