"""A training that reports to an Optuna trial: each epoch's validation accuracy, and the pruner's verdict.

An Optuna sweep (`tasks.sweeps.search`) hands each trial its study and number
(`--optuna-trial`); after every epoch, once the state file names it (`tasks.training.epochs`),
the training reports that epoch's validation accuracy to the study and asks its pruner whether
to go on. A trial the pruner stops is told `pruned` by the training itself and ends with
`TrialPrunedError`: no retry (the verdict would not change), no cached result (so the same options
trained again without a study resume after the last finished epoch, which is kept).

The pruner is not kept in the storage, so the sweep writes its name into the study
(`PRUNER_ATTR`) and every trial builds the same one here.

A pruner compares accuracies; on a small validation split most of their differences are
chance (on 20 pictures, 2 right against 4 is what two equal models do a third of the time).
So a trial is stopped only when its pruner says so and its best accuracy so far is also
unlikely to be chance below the median of the finished trials' at that epoch (those the median
pruner compares with; Fisher's exact test at `ALPHA`, on the validation pictures): on a few
hundred pictures only a trial clearly behind is stopped, on a few thousand the pruner works as
Optuna's does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tnflow.tasks.config.specs import TrialReport
from tnflow.tasks.core.errors import ConfigError, TnflowError
from tnflow.tasks.core.progress import run_logger

PRUNER_ATTR = "tnflow.pruner"
ALPHA = 0.05  # how unlikely a trial's gap to the others must be as chance before it is stopped
SQLITE_WAIT_SECONDS = 60  # how long a write waits for another process's lock on a shared SQLite file


class TrialPrunedError(TnflowError):
    """The study's pruner stopped this trial after an epoch; its finished epochs are kept."""


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("Optuna searches need Optuna: pip install 'tnflow[optuna]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines repeat what tnflow logs
    return optuna


def storage(url: str) -> Any:
    """The study's storage; a SQLite file's writers wait for each other instead of failing at once."""
    optuna = import_optuna()
    engine = {"connect_args": {"timeout": SQLITE_WAIT_SECONDS}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors: a bad URL, a server out of reach, no driver
        text = " ".join(str(exc).split())[:200]
        raise ConfigError(f"--optuna-storage {url}: cannot open it ({text})") from None


def pruner(name: str) -> Any:
    """median: below the median of the finished trials at the same epoch (from the third trial, the second epoch on);
    halving: asynchronous successive halving, the best third going on at epochs 1, 3, 9...; none: never."""
    optuna = import_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)  # steps are epochs, from 1
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def epoch_reporter(
    report: TrialReport | None, epochs: int, valid_images: int
) -> Callable[[dict[str, Any]], None] | None:
    """What a training of `epochs` epochs calls after each to report it to its Optuna trial (None: to none).

    `valid_images`: the validation split its accuracies are measured on (the pruner's evidence).
    The last epoch is reported but never pruned: stopping there saves no training, and would
    only take a finished trial out of the choice.
    """
    if report is None:
        return None
    optuna = import_optuna()
    store = storage(report.storage)
    try:
        study = optuna.load_study(study_name=report.study, storage=store)
    except KeyError:
        raise ConfigError(f"--optuna-study {report.study}: {report.storage} has no such study") from None
    study.pruner = pruner(str(study.user_attrs.get(PRUNER_ATTR, "none")))
    trial_id = store.get_trial_id_from_study_id_trial_number(study._study_id, report.trial)
    trial = optuna.trial.Trial(study, trial_id)
    log = run_logger()

    def reported(record: dict[str, Any]) -> None:
        epoch, accuracy = int(record["epoch"]), float(record["valid_accuracy"])
        try:
            trial.report(accuracy, epoch)
            prune = epoch < epochs and trial.should_prune()
        except RuntimeError as exc:  # the trial already ended (told by a sweep before): nothing to report to
            log.warning("Optuna trial %d of %s takes no more reports (%s)", report.trial, report.study, exc)
            return
        if not prune:
            return
        best = max(v for step, v in study._storage.get_trial(trial_id).intermediate_values.items() if step <= epoch)
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        others = [t.intermediate_values[epoch] for t in finished if epoch in t.intermediate_values]
        median = float(np.median(others)) if others else best
        p_value = behind(best, median, valid_images)
        if p_value >= ALPHA:
            log.info(
                "the %s pruner would stop this trial after epoch %d (best %.4f, the finished trials' median "
                "%.4f), but on %d validation pictures that gap is chance-like (p = %.2g): it goes on",
                study.user_attrs.get(PRUNER_ATTR), epoch, best, median, valid_images, p_value,
            )  # fmt: skip
            return
        study.tell(report.trial, state=optuna.trial.TrialState.PRUNED)
        raise TrialPrunedError(
            f"pruned after epoch {epoch}: best validation accuracy {best:.4f} against the finished trials' median "
            f"{median:.4f} at that epoch in the Optuna study {report.study} (p = {p_value:.2g} on {valid_images} "
            "pictures); its finished epochs are kept: the same options trained again resume after them"
        )

    return reported


def behind(accuracy: float, reference: float, pictures: int) -> float:
    """How likely an accuracy this far below `reference` is as chance, both on `pictures` (Fisher's exact test)."""
    from scipy.stats import fisher_exact

    mine, theirs = round(accuracy * pictures), round(reference * pictures)
    if pictures <= 0 or mine >= theirs:
        return 1.0
    table = [[mine, pictures - mine], [theirs, pictures - theirs]]
    return float(fisher_exact(table, alternative="less").pvalue)
