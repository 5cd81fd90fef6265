"""The whole pipeline as one Prefect flow: seven tasks, a run directory, caching, recovery, the champion."""

import base64
import dataclasses
import json
import os
import shutil
import socket
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError

import tnflow.flows.train as train_flow
from tests.fake_weights import VGG_CONV, write_fake_weights
from tests.fakes import make_archive
from tests.prefect_runs import task_states
from tnflow.flows.cli.main import main
from tnflow.flows.train import transfer_learning
from tnflow.tasks.core.errors import ConfigError
from tnflow.tasks.store.layout import metrics_file

pytestmark = pytest.mark.slow

STAGES = (
    "download", "build-cache", "starting-point", "train", "validate", "label-review", "export", "promote", "report"
)  # fmt: skip
HISTORY_FIELDS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_accuracy",
    "seconds",
    "images_per_second",
    "learning_rate",  # the schedule's at the epoch's end (TensorBoard's curve too)
    "trained",  # "head" during --freeze-epochs, else "all"
    "temperature",  # applied to the model's probabilities if this epoch is the best (1: not applied)
    "calibration",  # the temperature fitted on the validation split, whether it was applied, and why
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    _, data_md5 = make_archive(root / "c10.tar.gz", n_train=260, n_test=60)
    weights_md5 = write_fake_weights(root / "vgg19-conv.h5", "vgg19", count=VGG_CONV)
    return {
        "data_url": (root / "c10.tar.gz").as_uri(),
        "data_md5": data_md5,
        "weights": str(root / "vgg19-conv.h5"),
        "weights_md5": weights_md5,
        "image_size": 32,
        "head": "gap",
        "valid_size": 60,
        "epochs": 1,
        "learning_rate": 1e-4,
        "eval_batch_size": 64,
    }


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.headings = [], 0

    def handle_starttag(self, tag, attrs):
        self.sources += [dict(attrs)["src"]] if tag == "img" else []
        self.headings += tag == "h2"


def test_end_to_end_then_cached(prefect_api, inputs, tmp_path):
    params = {**inputs, "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")}
    first = transfer_learning(**params, return_state=True)
    assert first.is_completed()
    assert task_states(first) == dict.fromkeys(STAGES, "Completed")

    run = Path(first.result().run_dir)
    assert run.parent == tmp_path / "runs" and run.is_absolute()
    assert {"model", "metrics.json", "report.html", "report.md"} <= {p.name for p in run.iterdir()}
    model_json = json.loads((run / "model" / "model.json").read_text())
    assert model_json["head"] == "gap" and (run / "model" / "model.ckpt.index").is_file()
    assert (run / "model" / "saved_model" / "saved_model.pb").is_file(), "--export savedmodel is the default"
    assert model_json["card"]["test"]["images"] == 60 and model_json["card"]["data"]["images"]["test"] == 60
    card = (run / "model" / "model_card.md").read_text()
    assert "## Champion history" in card and "Not a champion" in card
    champion = (tmp_path / "runs" / "champion").resolve()
    assert (champion / "saved_model" / "saved_model.pb").is_file(), "the champion carries its exports"
    assert "first champion" not in (champion / "model_card.md").read_text()
    assert json.loads((champion / "model.json").read_text())["card"]["champion_history"][0]["run_id"] == run.name

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_test"] == 60 and 0 <= metrics["test_accuracy"] <= 1
    assert len(metrics["per_class_accuracy"]) == 10 and len(metrics["confusion_matrix"]) == 10
    assert metrics["valid_accuracy"] == metrics["history"][0]["valid_accuracy"]
    assert set(metrics["history"][0]) == HISTORY_FIELDS
    assert metrics["calibration"]["temperature"] == model_json["temperature"] == metrics["history"][0]["temperature"]
    assert "## Calibration on the test split" in (run / "report.md").read_text()
    assert metrics["config"]["epochs"] == 1 and metrics["config"]["head"] == "gap"
    assert metrics["promotion"]["promoted"] and "first champion" in metrics["promotion"]["reason"]
    low, high = model_json["card"]["test"]["ci95"]
    assert low < metrics["test_accuracy"] < high or metrics["test_accuracy"] in (0.0, 1.0)
    assert f"on 60 images (95% confidence interval {low:.4f} to {high:.4f}, Wilson)" in card
    assert all(f"| {name} | " in card for name in metrics["class_names"]), "a row per class: counts and accuracy"
    assert [t["name"] for t in metrics["timings"]][:5] == list(STAGES[:5])

    page = _Images()
    page.feed((run / "report.html").read_text())
    assert len(page.sources) == 5 and page.headings >= 7  # curves, confusion, samples, reliability, disputed
    assert "## Labels the model disputes" in (run / "report.md").read_text() and (run / "label_review.csv").is_file()
    for source in page.sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run / "report.md").read_text()
    assert "test accuracy" in markdown and "| download |" in markdown and "figures/samples.png" in markdown

    second = transfer_learning(**params, return_state=True)
    states = task_states(second)
    assert [states[s] for s in STAGES[:4]] == ["Cached"] * 4
    assert states["validate"] == states["export"] == states["promote"] == states["report"] == "Completed"
    exported = Path(second.result().run_dir) / "model" / "saved_model" / "variables" / "variables.index"
    assert exported.stat().st_ino == (run / "model" / "saved_model" / "variables" / "variables.index").stat().st_ino, (
        "a second run of the same model links the exports made once"
    )
    assert Path(second.result().run_dir) != run, "every run gets its own directory"
    scores = Path(second.result().run_dir) / "test_probabilities.npy"
    assert scores.stat().st_ino == (run / "test_probabilities.npy").stat().st_ino, "the same model is scored once"
    report = (Path(second.result().run_dir) / "report.md").read_text()
    assert "| train |" in report and "| hit |" in report
    assert "kept the champion" in report and "on the same test split" in report, "an equal model is not promoted"

    # The trained model's directory deleted by hand: the next run recovers it instead of failing forever.
    (trained,) = (tmp_path / "runs" / "training").glob("*/generation-1/models/epoch-1")
    shutil.rmtree(trained)
    third = transfer_learning(**params, return_state=True)
    assert third.is_completed() and task_states(third)["train"] == "Completed"
    assert (trained / "model.json").is_file()
    assert task_states(transfer_learning(**params, return_state=True))["train"] == "Cached"

    # A forced retrain trains again with unchanged inputs, and later runs reuse that new training.
    retrained = transfer_learning(**params, retrain=True, return_state=True)
    assert task_states(retrained)["train"] == "Completed"
    assert (trained.parents[2] / "generation-2" / "models" / "epoch-1" / "model.json").is_file()
    after = transfer_learning(**params, return_state=True)
    assert task_states(after)["train"] == "Cached"
    model_json = json.loads((Path(after.result().run_dir) / "model" / "model.json").read_text())
    assert model_json["epoch"] == 1


def named_paths(value) -> set[Path]:
    """Every path a stage's arguments name: strings, inside dataclasses, pydantic models, dicts and sequences."""
    if isinstance(value, str):
        return {Path(value)} if value.startswith("/") else set()
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return set().union(*(named_paths(v) for v in value)) if value else set()
    return set()


def hiding_what_is_not_handed(stage, hidden: list[str]):
    """`stage`, run with every file of the run directory that its arguments do not name moved away meanwhile.

    A stage that read a file some earlier stage left in the run directory without being handed
    it (a hidden channel) fails; one that reads only its arguments never notices.
    """

    def run(**arguments):
        run_dir = Path(arguments["run_dir"])
        named = {p for p in named_paths(arguments) if not run_dir.is_relative_to(p)}  # not the run dir's parents
        away = run_dir.parent / f"{run_dir.name}.away"
        moved = []
        for path in sorted(run_dir.rglob("*")):
            if path.is_file() and not any(path == p or path.is_relative_to(p) for p in named):
                target = away / path.relative_to(run_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
                moved.append((path, target))
        hidden.extend(f"{stage.name}: {path.name}" for path, _ in moved)
        try:
            return stage(**arguments)
        finally:
            for path, target in moved:
                path.parent.mkdir(parents=True, exist_ok=True)
                target.rename(path)

    return run


def test_a_smoke_run_never_blocks_a_better_full_run(prefect_api, inputs, tmp_path, monkeypatch):
    params = {**inputs, "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")}
    params["export"] = "none"  # five runs; the exports are the end-to-end test's
    smoke = {**params, "limit_train": 40, "limit_test": 20}
    unasked = Path(transfer_learning(**smoke).run_dir)
    promotion = json.loads((unasked / "metrics.json").read_text())["promotion"]
    assert not promotion["promoted"] and not (tmp_path / "runs" / "champion").exists(), "subsets do not promote"

    # Asked to promote, a model at chance is still no champion (it does not beat the majority class)...
    refused = json.loads(metrics_file(transfer_learning(**smoke, promote=True).run_dir).read_text())["promotion"]
    assert not refused["promoted"] and refused["reason"].startswith("no champion yet: "), refused["reason"]
    # ... unless the gate's tests are off (--promote-alpha 1): then it becomes the line's first champion,
    # as any first model did before the baseline rule. With --review-train 2, two fold trainings
    # score the training split for the label review. Every stage after training runs without the
    # files of the run directory that it was not handed: results travel as values.
    hidden = []
    for name in ("cross_fit_task", "review_task", "export_task", "promote_task", "report_task"):
        monkeypatch.setattr(train_flow, name, hiding_what_is_not_handed(getattr(train_flow, name), hidden))
    state = transfer_learning(**smoke, promote=True, promote_alpha=1.0, review_train=2, return_state=True)
    monkeypatch.undo()
    assert state.is_completed(), f"a stage read a file it was not handed: {state.message}"
    assert {"promote: test_metrics.json", "promote: test_probabilities.npy", "promote: label_review.csv",
            "report: train_probabilities.npy", "export: label_review.csv"} <= set(hidden), hidden  # fmt: skip
    asked = Path(state.result().run_dir)
    assert json.loads((asked / "metrics.json").read_text())["promotion"]["promoted"]
    assert task_states(state)["cross-fit"] == "Completed" and (asked / "train_probabilities.npy").is_file()
    assert "held-out and training in label_review.csv" in (asked / "report.md").read_text()

    # Two epochs: with one, this tiny setup (7 steps from fake weights) is still at chance on the
    # test split, as the smoke run is, and an equal model is rightly not promoted.
    full = Path(transfer_learning(**{**params, "epochs": 2}).run_dir)
    promotion = json.loads((full / "metrics.json").read_text())["promotion"]
    assert promotion["rescored"], "the smoke champion was measured on 20 images and is scored again on 60"
    assert promotion["promoted"], promotion["reason"]
    assert json.loads((tmp_path / "runs" / "champion" / "champion.json").read_text())["run_id"] == full.name
    report = (full / "report.md").read_text()
    assert "scored on it now" in report and promotion["compared_on"] in report
    assert "McNemar" in report and "only the champion" in report, "the gate's counts and p-value"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--epochs", "-1"], "--epochs must be an integer of at least 1"),
        (["--batch-size", "0"], "--batch-size must be an integer from 1 to 4096"),
        (["--model", "resnet18"], "invalid choice: 'resnet18'"),
        (["--head", "full", "--image-size", "64"], "--head full needs --image-size 224"),
        (["--review-train", "1"], "--review-train 1 leaves no picture out"),
        (["--gpus", "0"], "--gpus '0' is no number of GPUs: give 1 to 99, or all"),
        (["--gpu-slot", "a b"], "--gpu-slot 'a b' may only hold letters, digits, '-' and '_'"),
        (
            ["--output-dir", os.fsdecode(b"/tmp/caf\xe9")],
            "--output-dir /tmp/caf\\xe9 is not valid UTF-8 (a name in another system's encoding), and a run's "
            "options travel to Prefect as text: rename it, or link it under a UTF-8 name (ln -s)",
        ),
    ],
    ids=[
        "negative-epochs",
        "batch-size-0",
        "unknown-model",
        "full-head-at-64",
        "one-fold",
        "gpus-0",
        "slot-name",
        "path-not-utf8",
    ],
)
def test_bad_parameters_fail_before_any_download(file_server, tmp_path, capsys, options, message):
    command = ["run", "--data-url", file_server.url("c10.tar.gz"), "--cache-dir", str(tmp_path), *options]
    try:
        code = main(command)
    except SystemExit as exit_:  # argparse rejects unknown choices itself
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert file_server.requests == []


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ({"epochs": -1}, ParameterTypeError, "epochs"),  # Prefect checks the bounds the configuration declares
        ({"model": "resnet18"}, ParameterTypeError, "model"),
        ({"head": "full", "image_size": 64}, ConfigError, "--head full needs --image-size 224"),  # across fields
    ],
    ids=["bound", "choice", "across-fields"],
)
def test_the_flow_validates_its_parameters_first(prefect_api, file_server, tmp_path, bad, error, message):
    state = transfer_learning(data_url=file_server.url("x.tar.gz"), cache_dir=str(tmp_path), **bad, return_state=True)
    assert state.is_failed()
    with pytest.raises(error, match=message):
        state.result()
    # No task run to wait for: a few seconds let a wrongly started one's events arrive.
    assert task_states(state, timeout=3) == {} and file_server.requests == []


def test_without_network_the_default_run_names_the_way_out(prefect_api, capsys, tmp_path, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):  # loopback still resolves: the Prefect test server lives there
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    code = main(["run", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "www.cs.toronto.edu" in err[-1] and "--data-url" in err[-1] and "--weights" in err[-1]
