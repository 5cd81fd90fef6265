"""Optuna searches: a pruner that stops a training after its epoch (kept, resumable), and a sweep whose study
lives in a SQLite storage, continues when started again, and nests its trials' MLflow runs under its own."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.fake_weights import VGG_CONV, write_fake_weights
from tests.fakes import make_archive
from tnflow.tasks.cache.stage import build_cache
from tnflow.tasks.config.specs import CacheSpec, ModelSpec, TrainSettings, TrialReport
from tnflow.tasks.config.sweeps import SPACE, SweepConfig
from tnflow.tasks.core.errors import ConfigError
from tnflow.tasks.core.processes import run_in_threads
from tnflow.tasks.store.layout import generation_dir
from tnflow.tasks.sweeps.search import SWEEP_ATTR, OptunaSearch, distribution, study_name
from tnflow.tasks.training.pruning import PRUNER_ATTR, TrialPrunedError, epoch_reporter, storage
from tnflow.tasks.training.train import train
from tnflow.tasks.training.workdir import read_state

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def study_with(url: str, name: str, pruner: str, finished: list[list[float]]) -> optuna.Study:
    """A study whose earlier trials reported these validation accuracies, epoch by epoch, and ended."""
    study = optuna.create_study(storage=storage(url), study_name=name, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, pruner)
    for accuracies in finished:
        trial = study.ask()
        for epoch, accuracy in enumerate(accuracies, 1):
            trial.report(accuracy, epoch)
        study.tell(trial, max(accuracies))
    return study


@pytest.mark.parametrize(
    ("others", "mine", "pictures", "pruned_at"),
    [
        ([[0.9, 0.92, 0.95], [0.85, 0.9, 0.93]], [0.1, 0.12, 0.2], 300, 2),  # hopeless: stopped after warm-up
        ([[0.9, 0.92, 0.95], [0.85, 0.9, 0.93]], [0.88, 0.93, 0.96], 300, None),  # as good as the best: goes on
        ([[0.9, 0.92, 0.95]], [0.1, 0.12, 0.2], 300, None),  # one trial before it: too few to judge by
        ([[0.9, 0.92], [0.85, 0.9]], [0.1, 0.12], 300, None),  # its last epoch: stopping it there saves nothing
        # Small data: models at chance, 0.1 against 0.2 on 20 pictures is what equal models do: no verdict.
        ([[0.15, 0.2, 0.2], [0.1, 0.2, 0.3]], [0.1, 0.1, 0.1], 20, None),
        # The same gap on 3,000 pictures is no chance: stopped.
        ([[0.15, 0.2, 0.2], [0.1, 0.2, 0.3]], [0.1, 0.1, 0.1], 3000, 2),
        ([[0.9, 0.92, 0.95], [0.85, 0.9, 0.93]], [0.1, 0.12, 0.2], 10, 2),  # a strong gap shows on 10 pictures
    ],
)
def test_the_median_pruner_stops_a_trial_clearly_below_the_others_after_its_epoch(
    tmp_path, others, mine, pictures, pruned_at
):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = study_with(url, "s", "median", others)
    number = study.ask().number
    reported = epoch_reporter(TrialReport(url, "s", number), len(mine), pictures)
    stopped = None
    for epoch, accuracy in enumerate(mine, 1):
        try:
            reported({"epoch": epoch, "valid_accuracy": accuracy})
        except TrialPrunedError as pruned:
            stopped = epoch
            assert f"pruned after epoch {epoch}" in str(pruned) and "\n" not in str(pruned)
            break
    assert stopped == pruned_at
    trial = optuna.load_study(study_name="s", storage=url).trials[number]
    assert trial.state == (optuna.trial.TrialState.PRUNED if pruned_at else optuna.trial.TrialState.RUNNING)
    assert list(trial.intermediate_values) == list(range(1, (pruned_at or len(mine)) + 1)), "each epoch reported once"


def test_a_report_to_a_missing_study_is_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_with(url, "there", "median", [])
    with pytest.raises(ConfigError, match=r"--optuna-study gone: .* has no such study") as raised:
        epoch_reporter(TrialReport(url, "gone", 0), 3, 100)
    assert "\n" not in str(raised.value)


def test_a_trial_is_drawn_only_when_one_can_start_and_after_the_ended_ones_were_heard():
    """What lets TPE propose each trial from every trial that ended before it."""
    events: list[str] = []

    def calls():
        for number in range(5):
            events.append(f"draw {number}")
            yield functools.partial(lambda n: n, number)

    run_in_threads(calls(), 2, lambda number: events.append(f"heard {number}"))
    assert events[:2] == ["draw 0", "draw 1"] and len(events) == 10
    for number in range(2, 5):  # draw k only once a slot is free: at least k - 1 results heard before it
        before = events[: events.index(f"draw {number}")]
        assert sum(e.startswith("heard") for e in before) >= number - 1, events


def test_the_declared_ranges_are_optunas_distributions_and_a_study_is_named_after_what_it_searches():
    assert distribution(optuna, SPACE["learning_rate"]) == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert distribution(optuna, SPACE["batch_size"]) == optuna.distributions.CategoricalDistribution((16, 32, 64))
    base = {"search": "optuna", "trials": 4, "output_dir": "/tmp/o", "cache_dir": "/tmp/c"}
    name = study_name(SweepConfig.from_values(base))
    assert name == study_name(SweepConfig.from_values({**base, "trials": 8, "parallel": 4})), "more trials: same"
    assert name != study_name(SweepConfig.from_values({**base, "epochs": 3})), "another search: another study"
    assert name != study_name(SweepConfig.from_values({**base, "vary": "learning_rate"}))


@pytest.mark.slow
def test_a_trial_a_killed_sweep_left_running_is_proposed_again_and_a_live_sweeps_is_left_alone(prefect_api, tmp_path):
    from prefect import flow

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    space = {"learning_rate": distribution(optuna, SPACE["learning_rate"])}
    orphan, alive = study.ask(space), study.ask(space)
    orphan.set_user_attr(SWEEP_ATTR, str(uuid.uuid4()))  # a sweep flow run the server does not know

    @flow
    def a_live_sweep() -> None:
        from prefect.runtime import flow_run

        alive.set_user_attr(SWEEP_ATTR, flow_run.id)
        sweep = SweepConfig.from_values(
            {"search": "optuna", "trials": 3, "vary": "learning_rate", "optuna_storage": url, "optuna_study": "s",
             "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}
        )  # fmt: skip
        search = OptunaSearch(sweep, sweep_run_id="another")
        first = next(search.trials())
        assert first.options == orphan.params, "the orphan's options first: its training resumes"
        assert first.config.optuna_trial == 2 and first.name == "trial-3"
        states = {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}
        assert states == {0: TrialState.FAIL, 1: TrialState.RUNNING, 2: TrialState.RUNNING}, states
        assert search.earlier == [], "a replaced trial is no result"

    a_live_sweep()


@pytest.mark.slow
def test_a_pruned_training_keeps_its_epochs_and_the_same_options_resume_after_them(tmp_path, caplog):
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=50, n_test=10)
    cache = build_cache(tmp_path / "c10.tar.gz", md5, CacheSpec("cifar10", 32, 10, None, None, 0), tmp_path / "cache")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = study_with(url, "s", "median", [[0.99, 0.99, 0.99], [0.98, 0.99, 0.99]])  # no real trial reaches them
    number = study.ask().number
    spec, settings = ModelSpec("vgg19", "gap", 10, 32), TrainSettings(epochs=3, batch_size=16, learning_rate=1e-4)
    work = tmp_path / "work"
    with pytest.raises(TrialPrunedError, match="pruned after epoch 2"):
        train(
            cache.path, None, spec, settings, work, class_names=cache.class_names, eval_batch_size=64,
            on_epoch_end=epoch_reporter(TrialReport(url, "s", number), 3, 10),
        )  # fmt: skip
    state = read_state(generation_dir(work, 1))
    assert state.epochs_done == 2 and not state.finished, "its epochs kept, and not called finished"
    caplog.set_level(logging.INFO)
    trained = train(cache.path, None, spec, settings, work, class_names=cache.class_names, eval_batch_size=64)
    assert [r["epoch"] for r in trained.history] == [1, 2, 3]
    assert "resuming at epoch 3 of 3 (epochs 1-2 restored)" in caplog.text
    assert optuna.load_study(study_name="s", storage=url).trials[number].state == optuna.trial.TrialState.PRUNED


@pytest.mark.slow
def test_an_optuna_sweep_proposes_prunes_continues_its_study_and_nests_its_mlflow_runs(
    prefect_server, mlflow_server, tmp_path
):
    from mlflow import MlflowClient

    env = {**prefect_server["env"], "TNFLOW_LOCK_DIR": str(tmp_path / "locks")}
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=200, n_test=20)
    weights_md5 = write_fake_weights(tmp_path / "vgg19.h5", "vgg19", count=VGG_CONV)
    sweep = [str(BIN / "tnflow"), "sweep", "--search", "optuna", "--vary", "learning_rate,batch_size"]
    storage_url = f"sqlite:///{tmp_path / 'shared' / 'optuna.db'}"
    sweep += ["--pruner", "median", "--parallel", "1", "--mlflow-uri", mlflow_server]
    sweep += ["--optuna-storage", storage_url, "--optuna-study", "pets"]
    sweep += ["--data-url", str(tmp_path / "c10.tar.gz"), "--data-md5", md5, "--valid-size", "100"]
    sweep += ["--model", "vgg19", "--head", "gap", "--image-size", "32", "--epochs", "3", "--eval-batch-size", "64"]
    sweep += ["--weights", str(tmp_path / "vgg19.h5"), "--weights-md5", weights_md5, "--promote-alpha", "1"]
    sweep += ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs"), "--gpu-slot", "none"]

    def run(*args: str) -> Path:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return Path(done.stdout.strip().splitlines()[-1])

    # The three trials are queued in the study before the sweep starts (Optuna's enqueue_trial; the sweep asks
    # for them first): two that learn these pictures (0.39 and 0.33 after two epochs, on 100 validation
    # pictures), and Adam at 1e-3, too fast for VGG19 without batch norm from random weights: it stays at
    # chance (0.10), and the median pruner must stop it after its second epoch, of three.
    (tmp_path / "shared").mkdir()
    queued = optuna.create_study(study_name="pets", storage=storage_url, direction="maximize")
    for learning_rate, batch_size in ((1.25e-4, 16), (1e-5, 64), (1e-3, 16)):
        queued.enqueue_trial({"learning_rate": learning_rate, "batch_size": batch_size})
    first = run(*sweep, "--trials", "3")
    trials = optuna.load_study(study_name="pets", storage=storage_url).trials
    assert len(trials) == 3 and all(t.params.keys() == {"learning_rate", "batch_size"} for t in trials)
    assert all(1e-5 <= t.params["learning_rate"] <= 1e-3 and t.params["batch_size"] in (16, 32, 64) for t in trials)
    board = {row["name"]: row for row in json.loads((first / "leaderboard.json").read_text())}
    for trial in trials:  # the study, the leaderboard and the training agree on how each trial ended
        row = board[f"trial-{trial.number + 1}"]
        assert list(trial.intermediate_values) == list(range(1, len(trial.intermediate_values) + 1))
        if trial.state == optuna.trial.TrialState.PRUNED:
            epochs = max(trial.intermediate_values)
            assert row["state"] == f"Pruned after epoch {epochs}" and row["valid_accuracy"] is None and epochs == 2
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and row["state"] == "Completed"
            assert trial.value == pytest.approx(row["valid_accuracy"]) and len(trial.intermediate_values) == 3
    pruned = [f"trial-{t.number + 1}" for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned == ["trial-3"], "the hopeless trial is stopped, and only it"
    assert f"{len(pruned)} of 3 trials ({', '.join(pruned)}) by the Optuna pruner" in (first / "report.md").read_text()
    decision = json.loads((first / "decision.json").read_text())
    assert board[decision["winner"]]["valid_accuracy"] == max(
        r["valid_accuracy"] for r in board.values() if r["valid_accuracy"] is not None
    ), "the winner by validation accuracy"

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tnflow")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 3 and parent.info.status == "FINISHED"
    for run_ in nested:
        row = board["trial-" + run_.data.tags["prefect.flow_run_name"].rsplit("-trial-", 1)[1]]
        assert run_.info.status == ("FINISHED" if row["valid_accuracy"] is not None else "FAILED"), row
    champion = client.get_model_version_by_alias(tracking_name(tmp_path), "champion")
    winner_run = client.get_run(champion.run_id)
    assert winner_run.data.tags["prefect.flow_run_name"].endswith(decision["winner"]), "the winner's nested run"

    # The same sweep asked for one more trial: the study continues. The fourth is queued with the first's
    # options, so its training is the first's, from the cache (this test's subject is the study, not training).
    queued.enqueue_trial({"learning_rate": 1.25e-4, "batch_size": 16})
    again = run(*sweep, "--trials", "4")
    trials = optuna.load_study(study_name="pets", storage=storage_url).trials
    assert len(trials) == 4, "three from before, one new"
    rows = {row["name"]: row for row in json.loads((again / "leaderboard.json").read_text())}
    assert sorted(rows) == ["trial-1", "trial-2", "trial-3", "trial-4"]
    ran = [name for name, row in rows.items() if (row["flow_run_name"] or "").startswith(again.name)]
    assert ran == ["trial-4"] and rows["trial-4"]["training_cached"], "only the new trial ran"
    assert rows["trial-3"]["state"] == board["trial-3"]["state"], "the earlier trials as they ended"


def tracking_name(tmp_path: Path) -> str:
    (line,) = (tmp_path / "runs" / "champions").iterdir()
    return f"tnflow-{line.name}"
