"""sweep: plan the trials -> run them (a few at a time) -> choose by validation -> the champion gate -> report."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tnflow.flows.train import transfer_learning
from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.config.sweeps import SweepConfig, plan_trials
from tnflow.tasks.core.progress import quiet_hook_lines, run_logger
from tnflow.tasks.release.promote import promote_task
from tnflow.tasks.store.layout import new_sweep_dir
from tnflow.tasks.sweeps.leaderboard import Leaderboard, choose_winner, sweep_report_task
from tnflow.tasks.sweeps.trials import check_deployment, run_trials


@flow(name="sweep")
@flow_parameters(SweepConfig)
def sweep(config: SweepConfig) -> str:
    """Train a trial per set of options, choose by validation accuracy, gate only the winner; returns the sweep dir."""
    quiet_hook_lines()
    log = run_logger()
    trials = plan_trials(config)
    if config.deployment:
        check_deployment(config.deployment)
    sweep_dir = new_sweep_dir(config.output_dir, flow_run.name)
    board = Leaderboard(sweep_dir, trials)
    results = run_trials(
        trials,
        sweep_name=flow_run.name,
        deployment=config.deployment,
        parallel=config.parallel,
        subflow=transfer_learning,  # the trials' flow when no deployment is named
        on_finished=board.record,
        log=log,
    )
    winner = choose_winner(results, log)
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
    sweep_report_task(sweep_dir=sweep_dir, results=results, winner=winner, promotion=promotion)
    return sweep_dir
