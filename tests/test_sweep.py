"""Sweeps: trials checked up front, the winner by validation, and a grid on a work pool through a process worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import api_post, stop_process_group
from tests.fake_weights import VGG_CONV, write_fake_weights
from tests.fakes import make_archive
from tnflow.tasks.config.sweeps import SweepConfig, plan_trials
from tnflow.tasks.core.errors import ConfigError
from tnflow.tasks.sweeps.leaderboard import choice_evidence, choose_winner, leaderboard_rows
from tnflow.tasks.sweeps.trials import TrialResult
from tnflow.tasks.training.validate import write_predictions

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def planned(**values):
    return plan_trials(SweepConfig.from_values(values))


def test_a_grid_is_every_combination_and_each_trial_derives_its_own_defaults():
    trials = planned(grid=["learning_rate=1e-4,3e-4", "model=vgg19,mobilenet35v2"], epochs=2)
    assert [t.options for t in trials] == [
        {"learning_rate": 1e-4, "model": "vgg19"},
        {"learning_rate": 1e-4, "model": "mobilenet35v2"},
        {"learning_rate": 3e-4, "model": "vgg19"},
        {"learning_rate": 3e-4, "model": "mobilenet35v2"},
    ]
    vgg, mobilenet = trials[0].config, trials[1].config
    assert (vgg.head, vgg.image_size) == ("full", 224) and (mobilenet.head, mobilenet.image_size) == ("gap", 224)
    assert all(t.config.epochs == 2 and t.config.promote is False for t in trials), (
        "shared options; trials never promote"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"grid": ["learning_rate=abc"]}, "--grid learning_rate=abc: --learning-rate must be a number"),
        ({"grid": ["learning_rate=1e-4,2"]}, "trial-2 (learning_rate=2.0): --learning-rate must be a number from 0"),
        ({"grid": ["model=vgg19,vgg20"]}, "trial-2 (model=vgg20): --model 'vgg20' is unknown"),
        ({"grid": ["colour=red"]}, "--grid colour: tnflow run has no option --colour"),
        ({"grid": ["seed=1,2"]}, "--seed cannot vary between trials: every trial must see the same data"),
        ({"grid": ["valid_size=100,200"]}, "--valid-size cannot vary between trials"),
        ({"grid": ["gpus=1,2"]}, "--gpus cannot vary between trials: it says where or how a trial runs"),
        ({"grid": ["learning_rate"]}, "write OPTION=VALUE[,VALUE...]"),
        ({"grid": ["epochs=1", "epochs=2"]}, "--grid names epochs twice"),
        ({"grid": ["epochs=" + ",".join(map(str, range(1, 20))), "batch_size=" + ",".join(map(str, range(1, 20)))]},
         "--grid makes 361 trials; at most 256"),
        ({"random": 3, "vary": "momentum"}, "--vary momentum: there is no range for it"),
        ({"search": "optuna", "trials": 3, "vary": "momentum"}, "--vary momentum: there is no range for it"),
        ({"search": "optuna", "trials": 3, "vary": "seed"}, "--vary seed: --seed cannot vary between trials"),
        ({"vary": "learning_rate", "grid": ["epochs=1"]}, "--vary chooses what --random or --search optuna draws"),
        ({}, "give the trials with --grid OPTION=VALUES ..., --random N or --search optuna --trials N"),
        ({"random": 3, "search": "optuna", "trials": 3}, "(one of them)"),
        ({"search": "optuna"}, "--search optuna takes --trials N"),
        ({"random": 3, "trials": 3}, "--search optuna takes --trials N"),
        ({"grid": ["mlflow_uri=http://a,http://b"]}, "--mlflow-uri cannot vary between trials"),
        ({"grid": ["optuna_trial=1,2"]}, "--optuna-trial cannot vary between trials: the sweep sets it"),
    ],
)  # fmt: skip
def test_every_trial_is_checked_before_anything_starts(values, message):
    with pytest.raises(ConfigError) as raised:
        planned(**values)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_random_trials_are_drawn_from_the_declared_ranges_and_the_same_seed_draws_them_again():
    first = planned(random=6, vary="learning_rate,augment", seed=3)
    assert [t.options for t in first] == [t.options for t in planned(random=6, vary="learning_rate,augment", seed=3)]
    assert [t.options for t in first] != [t.options for t in planned(random=6, vary="learning_rate,augment", seed=4)]
    assert all(1e-5 <= t.options["learning_rate"] <= 1e-3 for t in first)
    assert {t.options["augment"] for t in first} <= {"none", "flip", "flip-crop"}


def test_a_bad_grid_is_one_line_and_exit_2_before_any_server_starts(capsys):
    from tnflow.flows.cli.main import main

    assert main(["sweep", "--grid", "learning_rate=1e-4,fast", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tnflow sweep: error: --grid learning_rate=fast" in err


def test_an_optuna_search_without_optuna_or_its_storage_is_one_line_before_any_server_starts(
    capsys, monkeypatch, tmp_path
):
    from tnflow.flows.cli.main import main

    search = ["sweep", "--search", "optuna", "--trials", "2", "--output-dir", str(tmp_path)]
    bad = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'optuna.db'}"
    assert main([*search, "--optuna-storage", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--optuna-storage {bad}: cannot open it (" in err, err
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    assert main(search) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Optuna searches need Optuna: pip install 'tnflow[optuna]'" in err, err


def result(name, valid, test, state="Completed"):
    return TrialResult(
        name=name, options={"learning_rate": 1e-4}, state=state, valid_accuracy=valid, test_accuracy=test
    )


def test_the_winner_is_chosen_by_validation_never_by_test(caplog):
    import logging

    results = [result("trial-1", 0.80, 0.95), result("trial-2", 0.85, 0.70), result("trial-3", None, None, "Failed")]
    assert choose_winner(results, logging.getLogger("t")).name == "trial-2", "the best test accuracy is not a vote"
    tie = [result("trial-1", 0.85, 0.60), result("trial-2", 0.85, 0.90)]
    assert choose_winner(tie, logging.getLogger("t")).name == "trial-1", "a tie goes to the earlier trial"
    rows = leaderboard_rows(results)
    assert [r["trial"] for r in rows] == ["trial-2", "trial-1", "trial-3"] and rows[2]["state"] == "Failed"
    reused = results[0].model_copy(update={"seconds": 4.2, "training_cached": True})
    assert leaderboard_rows([reused])[0]["time"] == "4 s (training cached)", "a 4 s trial trained nothing"
    assert leaderboard_rows([reused.model_copy(update={"training_cached": False})])[0]["time"] == "4 s"
    with pytest.raises(Exception, match="no trial finished"):
        choose_winner([result("trial-1", None, None, "Crashed")], logging.getLogger("t"))


def test_a_temporary_servers_flow_runs_are_named_not_linked(monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    import tnflow.tasks.core.prefect_server as server

    ended = TrialResult(
        name="trial-1", options={}, state="Completed", flow_run_id="abc", flow_run_name="brave-fox", valid_accuracy=0.5
    )
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4999/api", PREFECT_UI_URL: "http://127.0.0.1:4999"}):
        assert leaderboard_rows([ended])[0]["flow run"] == "[brave-fox](http://127.0.0.1:4999/runs/flow-run/abc)"
        monkeypatch.setattr(server, "_TEMPORARY", {"http://127.0.0.1:4999/api"})
        assert leaderboard_rows([ended])[0]["flow run"].startswith("brave-fox (a temporary server's: set PREFECT")


def trial_on(tmp_path: Path, name: str, right: np.ndarray, labels: np.ndarray, cache: Path) -> TrialResult:
    """A finished trial whose validation predictions are right exactly where `right` is."""
    run_dir = tmp_path / name
    kept, _ = write_predictions(run_dir, "valid", np.where(right, labels, (labels + 1) % 2), np.zeros((len(labels), 2)))
    accuracy = float(right.mean())
    return TrialResult(
        name=name, options={}, state="Completed", run_dir=str(run_dir), cache_path=str(cache), valid_accuracy=accuracy,
        predictions={"valid": kept},
    )  # fmt: skip


def test_a_choice_on_thirty_validation_pictures_says_when_it_is_a_coin_flip(tmp_path):
    import h5py

    labels = np.arange(30) % 2
    with h5py.File(tmp_path / "cache.h5", "w") as f:
        f["valid/labels"] = labels
    cache = tmp_path / "cache.h5"
    winner_right, runner_right = np.zeros(30, bool), np.zeros(30, bool)
    winner_right[:12] = True  # 12 right only for the winner
    runner_right[12:20] = True  # 8 right only for the runner-up
    winner = trial_on(tmp_path, "trial-1", winner_right, labels, cache)
    runner = trial_on(tmp_path, "trial-2", runner_right, labels, cache)
    said = choice_evidence([runner, winner], winner)
    assert said.startswith(
        "a coin flip could have made this choice: 12 validation pictures right only for trial-1, 8 only for trial-2 "
        "(of 30): McNemar's p = 0.5"
    ), said
    assert said.endswith("cannot be told from chance: add validation pictures")
    runner_right[:] = False
    runner_right[:1] = True  # the winner is right on 11 more pictures, the runner-up on none
    clear = choice_evidence([trial_on(tmp_path, "trial-3", runner_right, labels, cache), winner], winner)
    assert clear.startswith("unlikely to be chance: 11 validation pictures right only for trial-1, 0 only for trial-3")
    assert choice_evidence([winner], winner) == "no other trial finished: nothing to choose between"


# -- a grid on a work pool, through a process worker --------------------------------------


def stage_states(api: str, flow_run_ids: list[str], expected: dict[str, int]) -> dict[str, list[str]]:
    """Stage -> state names over the flow runs, once `expected` runs of each stage are recorded (events arrive late)."""
    deadline = time.monotonic() + 30
    while True:
        runs = api_post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}})
        states: dict[str, list[str]] = {}
        for run in runs:
            if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                states.setdefault(run["name"].rsplit("-", 1)[0], []).append(run["state"]["name"])
        if all(len(states.get(stage, [])) >= n for stage, n in expected.items()) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def most_at_once(runs: list[dict]) -> int:
    spans = [(datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for r in runs]
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


def test_a_grid_on_a_work_pool_two_at_a_time_picks_by_validation_and_gates_only_the_winner(prefect_server, tmp_path):
    api, env = prefect_server["api"], {**prefect_server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env["TNFLOW_LOCK_DIR"] = str(tmp_path / "locks")
    pool, slot = f"tnflow-sweep-{uuid.uuid4().hex[:6]}", f"tnflow-gpu-sweep-{uuid.uuid4().hex[:6]}"
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=60, n_test=20)
    weights_md5 = write_fake_weights(tmp_path / "vgg19.h5", "vgg19", count=VGG_CONV)
    api_post(api, "/v2/concurrency_limits/", {"name": slot, "limit": 2})  # two trainings at once on this host

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done

    run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
    run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "adhoc", "--pool", pool,
        "--prefect-file", "deployments/prefect.yaml")  # fmt: skip
    sweep = [str(BIN / "tnflow"), "sweep", "--deployment", "transfer-learning/adhoc", "--parallel", "2"]
    sweep += ["--grid", "learning_rate=1e-4,1e-3,3e-3"]  # three trials: one waits for a turn
    sweep += ["--data-url", str(tmp_path / "c10.tar.gz"), "--data-md5", md5, "--valid-size", "20"]
    # VGG19 at 32 px: one epoch on 40 pictures, where building the graph is most of the time, and
    # VGG19's is built faster than MobileNet's (README.md, "Which model a test trains").
    sweep += ["--model", "vgg19", "--head", "gap", "--image-size", "32", "--epochs", "1", "--batch-size", "16"]
    sweep += ["--weights", str(tmp_path / "vgg19.h5"), "--weights-md5", weights_md5, "--export", "none"]
    sweep += ["--eval-batch-size", "64", "--gpu-slot", slot]
    # One epoch from fake weights is at chance on 20 test pictures: the gate's tests would rightly keep the
    # winner from becoming a first champion. They are not this test's subject (test_promote.py): off.
    sweep += ["--promote-alpha", "1"]
    sweep += ["--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")]
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            first = Path(run(*sweep, timeout=600).stdout.strip().splitlines()[-1])
            again = Path(run(*sweep, timeout=600).stdout.strip().splitlines()[-1])
        finally:
            stop_process_group(worker)

    sweeps = {}
    for directory in (first, again):
        (parent,) = api_post(api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [directory.name]}}})
        children = api_post(
            api,
            "/flow_runs/filter",
            {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [parent["id"]]}}},
        )
        sweeps[directory] = (parent, [c for c in children if c["name"].startswith(f"{directory.name}-trial-")])
    parent, trials = sweeps[first]
    assert parent["state"]["type"] == "COMPLETED" and len(trials) == 3, [c["name"] for c in trials]
    assert all(t["deployment_id"] and t["state"]["type"] == "COMPLETED" for t in trials), "flow runs of the deployment"
    assert most_at_once(trials) == 2, "two at a time, never more"

    board = json.loads((first / "leaderboard.json").read_text())
    assert [b["name"] for b in board] == ["trial-1", "trial-2", "trial-3"]
    assert not any(b["training_cached"] for b in board), "the first sweep trains every trial"
    cached = json.loads((again / "leaderboard.json").read_text())
    assert all(b["training_cached"] for b in cached), "the second one trains none"
    best = max(board, key=lambda b: (b["valid_accuracy"], -board.index(b)))
    champion = json.loads((tmp_path / "runs" / "champion" / "champion.json").read_text())
    assert champion["run_id"] == Path(best["run_dir"]).name, "the winner is the best by validation"
    for entry in board:  # each trial's own gate was shut; only the sweep's gate saw the winner
        metrics = json.loads((Path(entry["run_dir"]) / "metrics.json").read_text())
        assert "a sweep's trial" in metrics["promotion"]["reason"], (entry["name"], metrics["promotion"])
    decision = json.loads((first / "decision.json").read_text())
    assert decision["winner"] == best["name"] and "first champion" in decision["promotion"]["reason"], decision
    gate = stage_states(api, [parent["id"]], {"promote": 1, "sweep-report": 1})
    assert len(gate["promote"]) == 1 and len(gate["sweep-report"]) == 1, gate

    (artifact,) = api_post(
        api, "/artifacts/latest/filter", {"artifacts": {"key": {"any_": ["tnflow-sweep-leaderboard"]}}}
    )
    table = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    assert len(table) == 3 and all("/runs/flow-run/" in row["flow run"] for row in table)
    assert table[0]["trial"] == best["name"], "best first"
    report = (first / "report.md").read_text()
    assert "## Validation accuracy against each option" in report and "### learning_rate" in report

    parent, trials = sweeps[again]
    assert parent["state"]["type"] == "COMPLETED" and len(trials) == 3
    stages = ("download", "build-cache", "starting-point", "train")
    states = stage_states(api, [t["id"] for t in trials], dict.fromkeys(stages, 3))
    for stage in stages:
        assert states[stage] == ["Cached"] * 3, (stage, states[stage])
