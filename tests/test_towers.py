"""Data-parallel towers on two logical CPU devices: one step as one device takes it, placement, resumption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import make_archive
from tnflow.tasks.cache.stage import build_cache
from tnflow.tasks.config.specs import CacheSpec
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.gpu_slot import gpu_count

REPO = Path(__file__).resolve().parents[1]


def towers(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.towers", *args], cwd=REPO, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


STEPS = {"sgd": "0.01", "adam": "1e-5"}  # the recipe's Adam learning rate


@pytest.fixture(scope="module")
def steps() -> dict:
    """Both optimizers' steps in one fresh process (one TensorFlow start-up)."""
    return towers("step", *(f"{optimizer}={rate}" for optimizer, rate in STEPS.items()))


@pytest.mark.slow  # the fixture is a fresh process with two TensorFlow graphs per optimizer: 13 s
@pytest.mark.parametrize("optimizer", list(STEPS))
def test_a_two_tower_step_is_the_one_device_step_at_the_same_global_batch(steps, optimizer):
    """5 images (shares of 3 and 2), flip-crop, label smoothing and weight decay: every weight within 1e-5."""
    result = steps[f"{optimizer}={STEPS[optimizer]}"]
    assert result["two vs one"] < 1e-5, result
    # The tolerance means something: the step moves weights by more, and a tower that saw
    # only its own share (a mean over 3, not 5) lands elsewhere.
    assert result["one vs start"] > 1e-3 if optimizer == "sgd" else result["one vs start"] > 5e-6, result
    assert result["first share vs one"] > 1e-4 if optimizer == "sgd" else result["first share vs one"] > 1e-7, result
    assert result["variables"]["two"] == result["variables"]["one"], "the second tower shares the first's variables"
    assert result["variable devices"] == ["/device:CPU:0"], "one set of variables, on the first device"
    assert result["conv placement"] == ["False /device:CPU:0", "True /device:CPU:1"], "each tower's convs on its device"


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _, md5 = make_archive(root / "c10.tar.gz", n_train=120, n_test=20)
    return build_cache(root / "c10.tar.gz", md5, CacheSpec("cifar10", 32, 40, None, None, 0), root / "cache")


@pytest.mark.slow  # three trainings in fresh processes
def test_a_killed_two_tower_training_resumes_exactly(small_cache, tmp_path):
    reference = towers("train", small_cache.path, str(tmp_path / "reference"))
    assert "/device:CPU:0, /device:CPU:1" in reference["device"], reference["device"]

    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-m", "tests.towers", "train", small_cache.path, str(work), "kill"],
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == -9, done.stderr.decode()[-3000:]
    assert json.loads((work / "generation-1" / "state.json").read_text())["epochs_done"] == 1

    resumed = towers("train", small_cache.path, str(work))
    timing = ("seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed["history"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in reference["history"]
    ]
    assert resumed["weights"] == reference["weights"], "bit for bit"


def test_gpus_asks_for_what_the_machine_has():
    assert gpu_count("1", 0) == 1 and gpu_count("all", 0) == 1, "the CPU: one tower"
    assert gpu_count("all", 8) == 8 and gpu_count("2", 8) == 2
    with pytest.raises(TnflowError, match="--gpus 4: TensorFlow sees 2 GPUs on this machine; pass --gpus 2 or all"):
        gpu_count("4", 2)
    with pytest.raises(TnflowError, match="--gpus 2: TensorFlow sees no GPU on this machine; pass --gpus 1 or all"):
        gpu_count("2", 0)
