import pytest

from tasks.config import DATASETS, Config
from tasks.errors import ConfigError


def test_defaults_are_the_recipe():
    config = Config()
    assert (config.dataset, config.image_size, config.valid_size) == ("cifar10", 224, 5000)
    assert config.source_url == DATASETS["cifar10"][0]
    assert config.source_md5 == "c58f30108f718f92721af3b95e74349a"


def test_a_mirror_url_keeps_the_official_digest_unless_given_one():
    assert Config(data_url="file:///x.tgz").source_md5 == DATASETS["cifar10"][1]
    assert Config(data_url="file:///x.tgz", data_md5="A" * 32).source_md5 == "a" * 32


@pytest.mark.parametrize(
    "values, option",
    [
        ({"image_size": 31}, "--image-size"),
        ({"image_size": 513}, "--image-size"),
        ({"image_size": "64"}, "--image-size"),
        ({"image_size": True}, "--image-size"),
        ({"valid_size": 0}, "--valid-size"),
        ({"limit_train": 0}, "--limit-train"),
        ({"limit_test": -5}, "--limit-test"),
        ({"seed": -1}, "--seed"),
        ({"dataset": "mnist"}, "--dataset"),
        ({"data_md5": "xyz"}, "--data-md5"),
        ({"data_url": " "}, "--data-url"),
        ({"cache_dir": ""}, "--cache-dir"),
        ({"epochz": 3}, "unknown option"),
    ],
    ids=lambda v: str(v),
)
def test_bad_values_name_the_option(values, option):
    with pytest.raises(ConfigError) as raised:
        Config.from_dict(values)
    message = str(raised.value)
    assert option in message and "\n" not in message


def test_none_means_default():
    assert Config.from_dict({"image_size": None, "limit_test": None}) == Config()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"head": "full", "image_size": 64}, "--head full needs --image-size 224"),
        ({"head": "dense"}, "--head 'dense' is unknown"),
        ({"model": "resnet50"}, "--model 'resnet50' is unknown"),
        ({"epochs": -1}, "--epochs must be an integer of at least 1"),
        ({"batch_size": 0}, "--batch-size must be an integer from 1 to 4096"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
        ({"learning_rate": -1e-5}, "--learning-rate"),
        ({"learning_rate": float("nan")}, "--learning-rate"),
        ({"weights_md5": "abc"}, "--weights-md5"),
        ({"xla": "yes"}, "--xla must be true or false"),
    ],
    ids=lambda v: str(v),
)
def test_bad_training_values(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Config.from_dict(values)


def test_head_follows_the_image_size_unless_given():
    assert Config().head == "full"
    assert Config(image_size=32).head == "gap"
    assert Config(image_size=224, head="gap").head == "gap"
    assert Config(learning_rate=0).learning_rate == 0.0
