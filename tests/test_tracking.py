"""MLflow: runs, their epochs and files, and registry aliases that follow the champion gate, on a real server."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.fake_weights import VGG_CONV, write_fake_weights
from tests.fakes import make_archive
from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.specs import Tracking
from tnflow.tasks.release import tracking


@pytest.fixture(autouse=True)
def _mlflow_answers_again():
    """Each test starts with MLflow not set aside by an earlier test's failure."""
    tracking._failed.clear()
    yield
    tracking._failed.clear()


def test_mlflow_out_of_reach_is_one_warning_and_nothing_else(caplog):
    """A run with MLflow down goes on: the first call warns once (in seconds, not the client's minutes), the rest
    are silent no-ops, and MLflow is asked again after a while."""
    gone = Tracking(f"http://127.0.0.1:{free_port()}", "tnflow")
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    assert tracking.open_run(gone, name="run", flow_run_id="abc", params={"epochs": 1}) is None
    assert time.monotonic() - started < 30
    assert tracking.find_run(gone, "abc") is None
    tracking.log_training(gone, "0" * 32, [{"epoch": 1, "train_loss": 1.0}])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the run goes on without MLflow" in warnings[0], warnings
    assert gone.uri in warnings[0]
    tracking._failed[gone.uri] -= tracking.SILENT_SECONDS  # a while later: asked again, and warned again
    assert tracking.open_run(gone, name="run", flow_run_id="abc", params={}) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_the_tracking_uri_comes_from_the_option_or_mlflows_variable(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert RunConfig.from_values({}).tracking() is None, "no MLflow unless asked"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert RunConfig.from_values({}).tracking() == Tracking("http://mlflow.example:5000", "tnflow", None)
    given = RunConfig.from_values({"mlflow_uri": "http://other:5000", "mlflow_experiment": "cats"})
    assert given.tracking() == Tracking("http://other:5000", "cats", None)


@pytest.mark.slow
def test_a_promotion_and_a_refused_candidate_move_the_registrys_aliases(
    mlflow_server, prefect_api, tmp_path, monkeypatch
):
    """Two runs logged to a real server: options, each epoch's figures with its step, the run's files; the
    first is promoted (version 1, alias champion), the second, the same model again, is refused by the
    gate (version 2, alias challenger) and `models:/...@champion` still loads the first's SavedModel."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from tnflow.flows.train import transfer_learning

    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=40, n_test=20)
    weights_md5 = write_fake_weights(tmp_path / "vgg19.h5", "vgg19", count=VGG_CONV)
    params = {
        "data_url": (tmp_path / "c10.tar.gz").as_uri(), "data_md5": md5, "weights": str(tmp_path / "vgg19.h5"),
        "weights_md5": weights_md5, "image_size": 32, "head": "gap", "valid_size": 20, "epochs": 2,
        "learning_rate": 1e-4, "eval_batch_size": 64, "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "runs"), "mlflow_uri": mlflow_server, "mlflow_experiment": "cifar-tests",
        # Two epochs on 20 pictures are near chance, which the gate's tests would rightly keep from becoming a
        # first champion; they are test_promote.py's subject, not this one's: any gain promotes.
        "promote_alpha": 1,
    }  # fmt: skip
    first = transfer_learning(**params, return_state=True)
    second = transfer_learning(**params, return_state=True)
    assert first.is_completed() and second.is_completed()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("cifar-tests")
    runs = {
        r.data.tags["prefect.flow_run_id"]: r for r in client.search_runs([experiment.experiment_id], max_results=10)
    }
    assert len(runs) == 2, "one MLflow run per flow run"
    ids = [str(state.state_details.flow_run_id) for state in (first, second)]
    run = runs[ids[0]]
    assert run.info.status == "FINISHED" and run.data.params["learning_rate"] == "0.0001"
    assert run.data.params["epochs"] == "2" and run.data.params["model"] == "vgg19"
    summary = first.result()
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "valid_accuracy")]
    assert sorted(history) == [(1, pytest.approx(history[0][1])), (2, pytest.approx(history[1][1]))]
    assert max(value for _, value in history) == pytest.approx(summary.valid_accuracy)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {1, 2}
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary.test_accuracy)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "metrics.json", "label_review.csv", "model_card.md", "figures"} <= files
    assert "saved_model" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}

    name = tracking.registered_model(summary.cache)
    assert name == "tnflow-" + (tmp_path / "runs" / "champions").iterdir().__next__().name, "named after its line"
    versions = {v.run_id: v for v in client.search_model_versions(f"name = '{name}'")}
    assert len(versions) == 2
    champion, challenger = (client.get_model_version_by_alias(name, alias) for alias in ("champion", "challenger"))
    assert champion.run_id == run.info.run_id and challenger.run_id == runs[ids[1]].info.run_id
    gate = json.loads(Path(second.result().run_dir, "metrics.json").read_text())["promotion"]
    assert not gate["promoted"] and client.get_model_version(name, challenger.version).tags["gate"] == gate["reason"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # as serving code finds its server (and registry)
    served = download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "served"))
    loaded = Path(served)
    assert (loaded / "saved_model" / "saved_model.pb").is_file() and (loaded / "labels.txt").is_file()
