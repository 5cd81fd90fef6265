"""Where a sweep's trials come from: a plan made up front (--grid, --random), or an Optuna study (--search optuna).

An Optuna sweep asks its study for a trial whenever a trial can start, after every trial that
ended before was told to the study, so TPE proposes each from what the others scored (with a
"constant liar" for the trials still running, so trials started together are not proposed
alike). Each trial's training reports its epochs to the study and may be pruned
(`tasks.training.pruning`); the sweep tells the study how every other trial ended: its best
validation accuracy, or failed.

The study lives in a storage every worker reaches (`--optuna-storage`; by default a SQLite file
under the output directory) and is named after the sweep's options (`--optuna-study` names
another), so the same sweep started again continues its study: trials that ended count toward
`--trials` and take part in the choice, and a trial left running by a sweep that is gone
(killed) is failed and proposed again with the same options, so its training resumes after its
last finished epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.exceptions import ObjectNotFound

from tnflow.tasks.config.sweeps import OneOf, Range, SweepConfig, Trial, make_trial, plan_trials
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.store.layout import optuna_database
from tnflow.tasks.sweeps.trials import PRUNED, TrialResult
from tnflow.tasks.training.pruning import PRUNER_ATTR, import_optuna, pruner, storage

RESULT_ATTR = "tnflow.result"  # the trial's leaderboard row, kept in the study for a sweep that continues it
SWEEP_ATTR = "tnflow.sweep"  # the flow run of the sweep that asked for the trial
REPLACED_ATTR = "tnflow.replaced"  # failed because its sweep was gone, and proposed again
# Options that do not change what the study searches: the same sweep with more trials, more at
# once, or elsewhere continues the same study.
NOT_THE_STUDY = ("trials", "parallel", "deployment", "mlflow_uri", "mlflow_experiment", "mlflow_parent")
NOT_THE_STUDY += ("optuna_storage", "optuna_study", "optuna_trial")


class Plan:
    """The trials of a grid or of random draws, all known before the first starts."""

    def __init__(self, trials: list[Trial]):
        self.planned = trials
        self.earlier: list[TrialResult] = []  # trials of an earlier sweep that count in this one's choice

    def trials(self) -> Iterator[Trial]:
        yield from self.planned

    def ended(self, result: TrialResult) -> TrialResult:
        return result

    def then(self, record: Callable[[TrialResult], None]) -> Callable[[TrialResult], None]:
        """What a sweep calls as each trial ends: the study told (`ended`), then `record` (the leaderboard)."""
        return lambda result: record(self.ended(result))


class OptunaSearch(Plan):
    """Trials proposed one by one by an Optuna study's TPE sampler, pruned by its pruner."""

    def __init__(self, sweep: SweepConfig, sweep_run_id: str):
        super().__init__([])
        optuna = import_optuna()
        self.optuna, self.sweep, self.sweep_run_id = optuna, sweep, sweep_run_id
        if sweep.optuna_storage is None:
            optuna_database(sweep.output_dir).parent.mkdir(parents=True, exist_ok=True)
        self.url = sweep.optuna_storage or f"sqlite:///{optuna_database(sweep.output_dir)}"
        self.name = sweep.optuna_study or study_name(sweep)
        self.space = {name: distribution(optuna, values) for name, values in sweep.varied().items()}
        self.study = optuna.create_study(
            storage=storage(self.url),
            study_name=self.name,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(
                seed=sweep.seed, constant_liar=True, n_startup_trials=startup_trials(sweep.trials or 0)
            ),
            pruner=pruner(sweep.pruner),
            load_if_exists=True,
        )
        self.study.set_user_attr(PRUNER_ATTR, sweep.pruner)  # every trial's training builds the same pruner
        self.asked: dict[str, Any] = {}  # trial name -> Optuna trial, while it runs
        self._replace_stale()
        self.earlier = [_earlier_result(t) for t in self._ended_trials()]
        run_logger().info(
            "Optuna study %r in %s: %d of %d trials ended before this sweep", self.name, self.url, len(self.earlier),
            sweep.trials,
        )  # fmt: skip

    def trials(self) -> Iterator[Trial]:
        """Trials asked of the study, each when one can start, until the study holds --trials of them."""
        while len({t.number for t in self._ended_trials()} | {a.number for a in self.asked.values()}) < (
            self.sweep.trials or 0
        ):
            asked = self.study.ask(self.space)
            asked.set_user_attr(SWEEP_ATTR, self.sweep_run_id)
            trial = make_trial(
                self.sweep,
                asked.number + 1,
                dict(asked.params),
                optuna_storage=self.url,
                optuna_study=self.name,
                optuna_trial=asked.number,
            )
            self.asked[trial.name] = asked
            yield trial

    def ended(self, result: TrialResult) -> TrialResult:
        """Tell the study how the trial ended (unless its training was pruned, which told it already)."""
        asked = self.asked.pop(result.name)
        frozen = self.study._storage.get_trial(asked._trial_id)
        if frozen.state == self.optuna.trial.TrialState.PRUNED:
            return result.model_copy(update={"state": _pruned(frozen)})
        asked.set_user_attr(RESULT_ATTR, result.model_dump(mode="json"))
        if result.finished:
            self.study.tell(asked, result.valid_accuracy)
        else:
            self.study.tell(asked, state=self.optuna.trial.TrialState.FAIL)
        return result

    def _ended_trials(self) -> list[Any]:
        ended = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
        ended += (self.optuna.trial.TrialState.FAIL,)
        trials = self.study.get_trials(deepcopy=False, states=ended)
        return [t for t in trials if not t.user_attrs.get(REPLACED_ATTR)]

    def _replace_stale(self) -> None:
        """Trials a sweep that is gone left running: failed, and their options proposed again first."""
        running = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,))
        for frozen in running:
            if _sweep_is_alive(frozen.user_attrs.get(SWEEP_ATTR)):
                continue
            self.study._storage.set_trial_user_attr(frozen._trial_id, REPLACED_ATTR, True)
            self.study.tell(frozen.number, state=self.optuna.trial.TrialState.FAIL)
            self.study.enqueue_trial(frozen.params)
            run_logger().info(
                "trial-%d was left running by a sweep that is gone: proposed again, its training resumes",
                frozen.number + 1,
            )


def check_search(sweep: SweepConfig) -> None:
    """Before anything starts: an Optuna sweep has Optuna, and the storage it names opens."""
    if sweep.search == "optuna":
        import_optuna()
        if sweep.optuna_storage:
            storage(sweep.optuna_storage)


def plan_search(sweep: SweepConfig, sweep_run_id: str) -> Plan:
    """The sweep's trials: planned and checked up front, or asked of an Optuna study as they can start."""
    if sweep.search == "optuna":
        return OptunaSearch(sweep, sweep_run_id)
    return Plan(plan_trials(sweep))


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the rest: Optuna's 10 would leave an 8-trial search all random."""
    return min(10, max(3, trials // 3))


def study_name(sweep: SweepConfig) -> str:
    """The study of a sweep: named after what it searches, so the same sweep started again continues it."""
    searched = {k: v for k, v in sweep.model_dump(mode="json").items() if k not in NOT_THE_STUDY}
    return f"tnflow-sweep-{short_digest(searched, 12)}"


def distribution(optuna: Any, values: Range | OneOf) -> Any:
    """A declared range as Optuna's distribution: the same bounds and scale, or the same choices."""
    if isinstance(values, Range):
        return optuna.distributions.FloatDistribution(values.low, values.high, log=values.log)
    return optuna.distributions.CategoricalDistribution(values.values)


def _pruned(frozen: Any) -> str:
    epochs = max(frozen.intermediate_values, default=0)
    return f"{PRUNED} after epoch {epochs}"


def _earlier_result(frozen: Any) -> TrialResult:
    """A trial an earlier sweep ended: its row as that sweep kept it, or (pruned) what the study knows."""
    kept = frozen.user_attrs.get(RESULT_ATTR)
    if kept:
        return TrialResult(**kept)
    state = _pruned(frozen) if frozen.state.name == "PRUNED" else frozen.state.name.capitalize()
    return TrialResult(name=f"trial-{frozen.number + 1}", options=dict(frozen.params), state=state)


def _sweep_is_alive(flow_run_id: str | None) -> bool:
    if not flow_run_id:
        return False
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            return False
    return run.state is not None and not run.state.is_final()
