"""Where everything lives under the output and cache directories: the one module that joins those paths.

    <output dir>/<run>/                              a flow run: metrics.json, report.md and .html,
                                                     figures/, label_review.csv, <split>_metrics.json,
                                                     <split>_<array>.npy, model/
    <output dir>/training/<model>-<head>-<size>px-<key>/generation-G/
                                                     a training's generation: state.json,
                                                     checkpoints/epoch-N/, models/epoch-N/ (and
                                                     models/epoch-N.exports-<digest>/, its exports;
                                                     models/epoch-N.scores-<digest>/, its validation)
    <output dir>/champions/<dataset key>/<run>/      a champion: its model directory, champion.json,
                                                     predictions/<split digest>.npy
    <output dir>/champions/<dataset key>/current     -> <run>: the line's champion
    <output dir>/champions/<dataset key>/history.jsonl   every promotion of the line, oldest first
    <output dir>/champion                            -> champions/<key>/<run>: the latest promoted
    <output dir>/sweeps/<sweep>/                     leaderboard.json, decision.json, report.md and .html,
                                                     figures/
    <output dir>/watch/<folder digest>.json          the change set the watcher last announced
    <output dir>/predictions/<flow run>.csv          a batch prediction's CSV
    <output dir>/in-use/<run>.json                   the cache version a live run reads (`in_use`)
    <cache dir>/<dataset>-<size>px-<digest>-<md5>.h5     a CIFAR cache
    <cache dir>/folder-<name>-<size>px-<key>.h5          one version of a folder's cache
    <cache dir>/folders/<folder digest>/stat-index.json  a folder's stat index (sizes, mtimes, digests)
    <cache dir>/folders/<lineage>.latest                 the name of a lineage's newest version
    <cache dir>/unpacked/<archive digest>/               an archive of a folder, unpacked
    <cache dir>/unpacked/<archive digest>.skipped        its members that were not written

Paths are functions of what determines their content (a digest of it, or a name the user
gave), so a re-run finds what an earlier one left. Everything else reads and writes through
these functions: renaming a file is one edit here, and `tnflow gc` knows every kind of file
it may meet. The layout is the one releases before this module wrote, unchanged.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from tnflow.tasks.core.digests import short_digest

# -- a run's directory ----------------------------------------------------------------------


def new_run_dir(output_dir: str | Path, run_name: str | None) -> str:
    """`<output dir>/<flow run name>` (or a timestamp outside a flow run), never an existing one."""
    base = run_name or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    path, n = Path(output_dir) / base, 1
    while path.exists():
        n += 1
        path = Path(output_dir) / f"{base}-{n}"
    return str(path)


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics.json"


def split_metrics(run_dir: str | Path, split: str) -> Path:
    """Every figure validation measured on a split (`tasks.training.validate.Validation.figures`)."""
    return Path(run_dir) / f"{split}_metrics.json"


def run_metrics_files(output_dir: str | Path) -> list[Path]:
    """Every run's metrics.json under `output_dir`."""
    return sorted(Path(output_dir).glob("*/metrics.json"))


def report_files(directory: str | Path) -> tuple[Path, Path]:
    """(report.md, report.html) of a run or a sweep."""
    return Path(directory) / "report.md", Path(directory) / "report.html"


def figure_file(directory: str | Path, name: str) -> Path:
    """`figures/<name>.png` beside a report (report.md links them by this relative path)."""
    return Path(directory) / "figures" / f"{name}.png"


def review_csv(run_dir: str | Path) -> Path:
    return Path(run_dir) / "label_review.csv"


def split_array(run_dir: str | Path, split: str, name: str) -> Path:
    """A run's per-picture array for a split: `<split>_<name>.npy` (probabilities, labels, ...)."""
    return Path(run_dir) / f"{split}_{name}.npy"


def run_model_dir(run_dir: str | Path) -> Path:
    """The run's model directory: the trained model's files linked, with its exports and card."""
    return Path(run_dir) / "model"


# -- training work directories -------------------------------------------------------------

_GENERATION = re.compile(r"^generation-(\d+)$")


def training_dir(output_dir: str | Path, model: str, head: str, image_size: int, key: str) -> Path:
    return Path(output_dir) / "training" / f"{model}-{head}-{image_size}px-{key}"


def training_lock(work_dir: str | Path) -> Path:
    """The path whose lock one training of a work directory holds at a time."""
    return Path(work_dir) / "training"


def generation_numbers(work_dir: str | Path) -> list[int]:
    root = Path(work_dir)
    found = [_GENERATION.match(p.name) for p in root.iterdir()] if root.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def generation_dir(work_dir: str | Path, generation: int) -> Path:
    return Path(work_dir) / f"generation-{generation}"


def state_file(generation: str | Path) -> Path:
    return Path(generation) / "state.json"


def checkpoint_dir(generation: str | Path, epoch: int) -> Path:
    """The full checkpoint of a finished epoch, for resuming."""
    return resume_checkpoints(generation) / f"epoch-{epoch}"


def epoch_model_dir(generation: str | Path, epoch: int) -> Path:
    """The model directory of the generation's best epoch so far."""
    return Path(generation) / "models" / f"epoch-{epoch}"


def shared_exports_dir(model_dir: str | Path, digest: str) -> Path:
    """A trained model's exports, beside it and named by its digest (pruned with it), shared by its runs."""
    return Path(model_dir).with_name(f"{Path(model_dir).name}.exports-{digest}")


def shared_scores_dir(model_dir: str | Path, digest: str) -> Path:
    """A trained model's validation on one split of one cache, beside it (pruned with it), shared by its runs.

    `digest` names what decides the scores (`tasks.training.validate.scores_key`).
    """
    return Path(model_dir).with_name(f"{Path(model_dir).name}.scores-{digest}")


def curves_dir(generation: str | Path) -> Path:
    """TensorBoard's event files of a generation's epochs: `tensorboard --logdir OUTPUT/training` finds them."""
    return Path(generation) / "tensorboard"


def epoch_entries(generation: str | Path, kind: str) -> list[tuple[str, Path]]:
    """(`epoch-N...` name, path) of everything under `checkpoints` or `models`, temporaries and exports included."""
    assert kind in ("checkpoints", "models"), kind
    return [(p.name, p) for p in (Path(generation) / kind).glob("epoch-*")]


def resume_checkpoints(generation: str | Path) -> Path:
    """The folder of resume checkpoints; an older generation drops it and keeps its models."""
    return Path(generation) / "checkpoints"


# -- champions ------------------------------------------------------------------------------

CHAMPION_JSON = "champion.json"


def champion_line(output_dir: str | Path, key: str) -> Path:
    """A dataset's champion line: its champions, `current`, and the history of promotions."""
    return Path(output_dir) / "champions" / key


def current_champion(line: str | Path) -> Path:
    """The link to the line's champion (the line's lock is this path's, too)."""
    return Path(line) / "current"


def current_champions(output_dir: str | Path) -> list[Path]:
    """The `current` link of every champion line under `output_dir`."""
    return sorted((Path(output_dir) / "champions").glob("*/current"))


def champion_dir(line: str | Path, run_id: str) -> Path:
    return Path(line) / run_id


def champion_record(champion: str | Path) -> Path:
    return Path(champion) / CHAMPION_JSON


def champion_records(output_dir: str | Path) -> list[Path]:
    """The champion.json of every champion ever promoted under `output_dir` (current or not)."""
    return sorted((Path(output_dir) / "champions").glob(f"*/*/{CHAMPION_JSON}"))


def champion_history(line: str | Path) -> Path:
    return Path(line) / "history.jsonl"


def champion_predictions(champion: str | Path, split: str) -> Path:
    """A champion's predicted class per image of the test split `split` identifies."""
    return Path(champion) / "predictions" / f"{short_digest(split, 16)}.npy"


def latest_champion(output_dir: str | Path) -> Path:
    """`<output dir>/champion`: the link to the latest promoted champion of any line."""
    return Path(output_dir) / "champion"


def latest_champion_target(key: str, run_id: str) -> Path:
    """What `latest_champion` links to, relative to the output directory (it moves with it)."""
    return Path("champions") / key / run_id


# -- sweeps, the watcher, batch predictions, runs in progress ----------------------------------


def new_sweep_dir(output_dir: str | Path, sweep_name: str | None) -> str:
    return new_run_dir(Path(output_dir) / "sweeps", sweep_name)


def sweep_decision_file(sweep_dir: str | Path) -> Path:
    """The sweep's winner and the champion gate's decision on it."""
    return Path(sweep_dir) / "decision.json"


def leaderboard_file(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / "leaderboard.json"


def optuna_database(output_dir: str | Path) -> Path:
    """The Optuna studies of the sweeps that name no storage (`--optuna-storage`): a SQLite file."""
    return (Path(output_dir) / "sweeps" / "optuna.db").resolve()


def watch_record(output_dir: str | Path, folder: str) -> Path:
    return Path(output_dir) / "watch" / f"{short_digest(folder, 16)}.json"


def predictions_csv(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "predictions" / f"{name}.csv"


def in_use_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "in-use"


# -- the cache directory ------------------------------------------------------------------------


def dataset_cache_file(cache_dir: str | Path, dataset: str, image_size: int, digest: str, source_md5: str) -> Path:
    """A downloaded dataset's cache (CIFAR): one file per source and spec."""
    return Path(cache_dir) / f"{dataset}-{image_size}px-{digest}-{source_md5[:8]}.h5"


def folder_cache_file(cache_dir: str | Path, name: str, image_size: int, key: str) -> Path:
    """One version of an image folder's cache."""
    return Path(cache_dir) / f"folder-{name}-{image_size}px-{key}.h5"


def folder_cache_files(cache_dir: str | Path) -> list[Path]:
    return sorted(Path(cache_dir).glob("folder-*.h5"))


def stat_index(cache_dir: str | Path, folder: str) -> Path:
    """The stat index of an image folder (`folder`: its identity, the absolute path the scan sees)."""
    return Path(cache_dir) / "folders" / short_digest(folder) / "stat-index.json"


def lineage_pointer(cache_dir: str | Path, lineage: str) -> Path:
    """The file naming the newest cache version of a folder lineage (the next build reuses its pixels)."""
    return Path(cache_dir) / "folders" / f"{lineage}.latest"


def lineage_pointers(cache_dir: str | Path) -> list[Path]:
    return sorted(Path(cache_dir).glob("folders/*.latest"))


def unpacked_dir(cache_dir: str | Path, digest: str) -> Path:
    """Where an archive of a folder with this digest is unpacked."""
    return Path(cache_dir) / "unpacked" / digest


def unpacked_skipped(cache_dir: str | Path, digest: str) -> Path:
    """The members of that archive that were not written (beside the folder, so no scan sees it)."""
    return Path(cache_dir) / "unpacked" / f"{digest}.skipped"
