"""batch_predict: score a folder of pictures with a model (the champion by default) into a CSV."""

from __future__ import annotations

from prefect import flow

from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.config.scoring import ScoreConfig
from tnflow.tasks.core.progress import quiet_hook_lines
from tnflow.tasks.release.predict import score_folder_task


@flow(name="batch-predict")
@flow_parameters(ScoreConfig)
def batch_predict(config: ScoreConfig) -> str:
    """Score every picture under a folder; returns the CSV's path (its class counts are an artifact)."""
    quiet_hook_lines()
    scored = score_folder_task(
        model=config.model,
        folder=config.folder,
        output_dir=config.output_dir,
        out=config.out,
        batch_size=config.batch_size,
        to_label=config.to_label,
    )
    return scored.csv
