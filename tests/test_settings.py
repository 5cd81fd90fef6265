"""The one declared configuration: its checks, and everything pinned to it (CLI, flows, deployments)."""

import inspect

import pytest

from tnflow.flows.cli.main import build_parser
from tnflow.flows.cli.serve import load_deployments
from tnflow.flows.prepare import prepare_data
from tnflow.flows.sweep import sweep
from tnflow.flows.train import transfer_learning
from tnflow.tasks.config.datasets import SOURCES
from tnflow.tasks.config.options import DataConfig, RunConfig
from tnflow.tasks.config.parameters import KIND_NAMES, option
from tnflow.tasks.config.scoring import ScoreConfig, WatchConfig
from tnflow.tasks.config.sweeps import SweepConfig, plan_trials
from tnflow.tasks.core.errors import ConfigError


def test_defaults_are_the_recipe():
    config = RunConfig()
    assert (config.dataset, config.image_size, config.cache_spec().valid_size, config.head) == (
        "cifar10",
        224,
        5000,
        "full",
    )
    assert (config.epochs, config.batch_size, config.learning_rate, config.weights) == (7, 32, 1e-5, "imagenet")
    assert config.source_url == SOURCES["cifar10"][0]
    assert config.source_md5 == "c58f30108f718f92721af3b95e74349a"


def test_the_source_decides_the_dataset():
    folder = DataConfig(data_dir="photos")
    assert folder.dataset == "folder" and folder.data_dir.endswith("/photos") and folder.source_md5 is None
    spec = folder.cache_spec()
    assert (spec.valid_size, spec.test_size, spec.resize) == (0.1, 0.2, "crop")
    assert DataConfig(data_url="https://example.org/photos.zip").dataset == "folder"
    assert DataConfig(data_url="https://example.org/photos.tar.gz", dataset="folder").source_md5 is None
    assert DataConfig(data_url="file:///x.tar.gz").dataset == "cifar10"
    assert DataConfig(data_dir="p", valid_size=500.0, test_size=0.25).cache_spec().valid_size == 500  # a count
    assert DataConfig(valid_size=0.1).cache_spec().valid_size == 0.1


def test_a_mirror_url_keeps_the_official_digest_unless_given_one():
    assert DataConfig(data_url="file:///x.tgz").source_md5 == SOURCES["cifar10"][1]
    assert DataConfig(data_url="file:///x.tgz", data_md5="A" * 32).source_md5 == "a" * 32


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image_size": 31}, "--image-size must be an integer from 32 to 512, got 31"),
        ({"image_size": 513}, "--image-size must be an integer from 32 to 512, got 513"),
        ({"image_size": "64"}, "--image-size must be an integer"),
        ({"image_size": True}, "--image-size must be an integer"),
        ({"valid_size": 0}, "--valid-size must be a number above 0, got 0"),
        ({"limit_train": 0}, "--limit-train"),
        ({"limit_test": -5}, "--limit-test"),
        ({"seed": -1}, "--seed"),
        ({"dataset": "mnist"}, "--dataset 'mnist' is unknown; choose one of"),
        ({"data_md5": "xyz"}, "--data-md5 'xyz' is not an md5 digest"),
        ({"data_url": " "}, "--data-url is empty"),
        ({"cache_dir": ""}, "--cache-dir is empty"),
        ({"epochz": 3}, "unknown option(s): epochz"),
        ({"head": "full", "image_size": 64}, "--head full needs --image-size 224"),
        ({"head": "dense"}, "--head 'dense' is unknown"),
        ({"model": "resnet18"}, "--model 'resnet18' is unknown"),
        ({"model": "inception3", "image_size": 64}, "inception3 needs --image-size of at least 75"),
        ({"model": "mobilenet35v2", "head": "full"}, "--head full is for VGG's classifier layers"),
        ({"epochs": 2, "freeze_epochs": 2}, "--freeze-epochs 2 leaves no epoch to train the whole network"),
        ({"augment": "mixup"}, "--augment 'mixup' is unknown"),
        ({"epochs": -1}, "--epochs must be an integer of at least 1"),
        ({"batch_size": 0}, "--batch-size must be an integer from 1 to 4096"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
        ({"learning_rate": -1e-5}, "--learning-rate must be a number from 0 to below 1"),
        ({"learning_rate": float("nan")}, "--learning-rate must be a number"),
        ({"weights_md5": "abc"}, "--weights-md5"),
        ({"xla": "yes"}, "--xla must be true or false"),
        ({"promote_margin": 1.5}, "--promote-margin must be a number from 0 to below 1"),
        ({"data_dir": "/x", "data_url": "file:///y.zip"}, "give --data-dir (a folder) or --data-url"),
        ({"dataset": "folder"}, "--dataset folder needs --data-dir DIR"),
        ({"dataset": "cifar10", "data_dir": "/x"}, "--data-dir is for your own images"),
        ({"test_size": 0.2}, "--test-size is for folders; cifar10 has its official test set"),
        ({"data_dir": "/x", "test_size": 2.5}, "--test-size 2.5 is neither a count"),
        ({"data_dir": "/x", "valid_size": -0.1}, "--valid-size must be a number above 0"),
        ({"data_dir": "/x", "resize": "fit"}, "--resize 'fit' is unknown; choose one of: 'crop', 'stretch' or 'pad'"),
        ({"data_dir": "/x", "max_bad": 2}, "--max-bad must be a number from 0 to 1"),
    ],
    ids=lambda v: str(v),
)
def test_bad_values_name_the_option_in_one_line(values, message):
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_values(values)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_none_means_default_and_values_are_normalised(tmp_path):
    assert RunConfig.from_values({"image_size": None, "limit_test": None}) == RunConfig()
    config = RunConfig(learning_rate=0, data_md5="A" * 32, cache_dir=str(tmp_path / "x" / ".." / "c"))
    assert config.learning_rate == 0.0 and config.data_md5 == "a" * 32 and config.cache_dir.startswith("/")


def test_head_follows_the_image_size_unless_given():
    assert RunConfig(image_size=32).head == "gap"
    assert RunConfig(image_size=224, head="gap").head == "gap"


def test_derived_defaults_are_resolved_yet_only_what_was_given_counts_as_given():
    config = RunConfig.from_values({"model": "inception3", "preset": "strong", "data_dir": "/x", "tta": "none"})
    assert config.model_fields_set == {"model", "preset", "data_dir", "tta"}
    assert (config.dataset, config.image_size, config.head, config.train_bn) == ("folder", 299, "gap", False)
    assert (config.augment, config.label_smoothing, config.tta) == ("flip-crop", 0.1, "none"), "given wins"
    assert (config.valid_size, config.test_size) == (0.1, 0.2)
    assert DataConfig().image_size == 224 and DataConfig().test_size is None
    again = RunConfig.from_values({n: getattr(config, n) for n in config.model_fields_set} | {"model": "vgg19"})
    assert (again.image_size, again.head) == (224, "full"), "a trial's own model sets its derived defaults"


@pytest.mark.parametrize("model", [DataConfig, RunConfig, SweepConfig, ScoreConfig, WatchConfig])
def test_every_configuration_is_frozen_and_strict(model):
    assert model.model_config["frozen"] and model.model_config["strict"]
    name, kind = next((n, f.annotation) for n, f in model.model_fields.items() if f.annotation in (int, float))
    required = {n: "/x" for n in ("folder", "data_dir") if n in model.model_fields}
    with pytest.raises(ConfigError, match=f"{option(name)} must be {KIND_NAMES[kind]}"):  # not coerced from text
        model.from_values({**required, name: "3"})


@pytest.mark.parametrize(
    "values, promotes",
    [({}, True), ({"limit_train": 10}, False), ({"limit_test": 10}, False), ({"limit_test": 10, "promote": True}, True),
     ({"promote": False}, False)],
)  # fmt: skip
def test_runs_on_subsets_do_not_promote_unless_asked(values, promotes):
    assert RunConfig(**values).promotes is promotes


# -- everything else takes its parameters from the configuration --------------------------


def _options(command: str) -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "debug")}


@pytest.mark.parametrize("command, model", [("prepare", DataConfig), ("run", RunConfig), ("sweep", SweepConfig)])
def test_every_field_is_a_command_line_option(command, model):
    options = _options(command)
    assert set(options) == set(model.model_fields)
    for name, action in options.items():
        assert action.option_strings[0] == option(name)
        assert action.help and model.model_fields[name].description in action.help


@pytest.mark.parametrize(
    "flow, model", [(prepare_data, DataConfig), (transfer_learning, RunConfig), (sweep, SweepConfig)]
)
def test_every_field_is_a_flow_parameter(flow, model):
    parameters = inspect.signature(flow.fn).parameters
    assert list(parameters) == list(model.model_fields)
    for name, field in model.model_fields.items():
        expected = None if field.default_factory else field.default
        assert parameters[name].default == expected, name
    schema = flow.parameters.model_dump()["properties"]
    bounds = schema["image_size"].get("anyOf", [schema["image_size"]])[0]  # run: int or None (the model's size)
    assert bounds["minimum"] == 32 and bounds["maximum"] == 512
    assert schema["image_size"]["description"] == model.model_fields["image_size"].description


def test_deployment_parameters_are_configuration_values():
    configurations = {
        "flows/train.py:transfer_learning": RunConfig,
        "flows/sweep.py:sweep": SweepConfig,
        "flows/predict.py:batch_predict": ScoreConfig,
        "flows/watch.py:watch_folder": WatchConfig,
    }
    for deployment in load_deployments():
        parameters = deployment.get("parameters") or {}
        config = configurations[deployment["entrypoint"]]
        assert set(parameters) <= set(config.model_fields), deployment["name"]
        if config is SweepConfig:
            plan_trials(SweepConfig.from_values(parameters))  # every trial's values, checked
        elif config is RunConfig:
            RunConfig.from_values(parameters)  # valid values, or a ConfigError that fails the test
        elif config is WatchConfig:  # the folder is set when the deployment is
            WatchConfig.from_values({"data_dir": "/data/photos", **parameters})
        else:  # the folder is given per run
            ScoreConfig.from_values({"folder": "/data/inbox", **parameters})
        for trigger in deployment.get("triggers") or []:  # what an event fills in is a run option too
            assert set(trigger.get("parameters") or {}) <= set(config.model_fields), deployment["name"]
    weekly = next(d for d in load_deployments() if d["name"] == "retrain-weekly")
    assert weekly["parameters"]["retrain"] is True, "a scheduled retrain must train again, not just re-evaluate"


def test_the_cli_parses_into_the_configuration():
    args = build_parser().parse_args(["run", "--image-size", "64", "--retrain", "--no-promote", "--epochs", "2"])
    values = {name: getattr(args, name) for name in RunConfig.model_fields}
    config = RunConfig.from_values(values)
    assert (config.image_size, config.retrain, config.promote, config.epochs, config.head) == (
        64,
        True,
        False,
        2,
        "gap",
    )


def test_the_batch_predict_flow_asks_for_a_folder_and_nothing_else():
    from prefect.utilities.callables import parameter_schema

    from tnflow.flows.predict import batch_predict

    schema = parameter_schema(batch_predict.fn).model_dump()
    assert schema["required"] == ["folder"]
    assert (
        schema["properties"]["model"]["default"] == "champion" and schema["properties"]["batch_size"]["maximum"] == 4096
    )
    with pytest.raises(ConfigError, match="--batch-size must be an integer from 1 to 4096, got 0"):
        ScoreConfig.from_values({"folder": "/data/inbox", "batch_size": 0})
