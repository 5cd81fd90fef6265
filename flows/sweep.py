"""sweep: plan the trials (or open the Optuna study) -> run them (a few at a time) -> choose by validation -> the
champion gate -> report (and MLflow, when asked)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tnflow.flows.train import transfer_learning
from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.config.sweeps import SweepConfig
from tnflow.tasks.core.progress import quiet_hook_lines, run_logger
from tnflow.tasks.release.promote import promote_task
from tnflow.tasks.release.tracking import end_failed_run, open_run_task
from tnflow.tasks.store.layout import new_sweep_dir
from tnflow.tasks.sweeps.leaderboard import Leaderboard, choose_winner, close_sweep_run_task, sweep_report_task
from tnflow.tasks.sweeps.search import plan_search
from tnflow.tasks.sweeps.trials import check_deployment, run_trials


@flow(name="sweep", on_failure=[end_failed_run], on_crashed=[end_failed_run])
@flow_parameters(SweepConfig)
def sweep(config: SweepConfig) -> str:
    """Train a trial per set of options, choose by validation accuracy, gate only the winner; returns the sweep dir."""
    quiet_hook_lines()
    log = run_logger()
    plan = plan_search(config, sweep_run_id=flow_run.id)
    if config.deployment:
        check_deployment(config.deployment)
    tracked = (  # the sweep's MLflow run, its trials' nested under it, when asked
        open_run_task(
            tracking=config.tracking(), name=flow_run.name, flow_run_id=flow_run.id, params=config.model_dump()
        )
        if config.mlflow_uri
        else None
    )
    sweep_dir = new_sweep_dir(config.output_dir, flow_run.name)
    board = Leaderboard(sweep_dir, plan.planned, plan.earlier)
    run_trials(
        plan.trials(),
        base=config,
        sweep_name=flow_run.name,
        deployment=config.deployment,
        parallel=config.parallel,
        subflow=transfer_learning,  # the trials' flow when no deployment is named
        on_finished=plan.then(board.record),
        log=log,
        mlflow_parent=tracked,
    )
    winner = choose_winner(board.all(), log)
    promotion = promote_task(
        model_dir=winner.model_dir,
        run_dir=winner.run_dir,
        test_accuracy=winner.test_accuracy,
        test_predictions=winner.predictions["test"],
        cache_path=winner.cache_path,
        output_dir=config.output_dir,
        gate=config.gate_settings(),
        eval_batch_size=config.eval_batch_size,
    )
    sweep_report_task(sweep_dir=sweep_dir, results=board.all(), winner=winner, promotion=promotion)
    if tracked:
        close_sweep_run_task(
            tracking=config.tracking(), run_id=tracked, sweep_dir=sweep_dir, winner=winner, promotion=promotion
        )
    return sweep_dir
