"""watch_folder: compare an image folder with its champion's pictures -> announce a change set once."""

from __future__ import annotations

from prefect import flow

from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.config.scoring import WatchConfig
from tnflow.tasks.core.progress import quiet_hook_lines
from tnflow.tasks.release.watch import watch_task


@flow(name="watch-folder")
@flow_parameters(WatchConfig)
def watch_folder(config: WatchConfig) -> bool:
    """Emit tnflow.dataset.changed when enough pictures changed since the champion; returns whether it did."""
    quiet_hook_lines()
    changes = watch_task(
        folder=config.data_dir, cache_dir=config.cache_dir, output_dir=config.output_dir, min_new=config.min_new
    )
    return changes.announced
