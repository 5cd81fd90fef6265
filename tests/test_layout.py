"""The house rules that keep stages fast to import and easy to test."""

import subprocess
import sys

import pytest

TF_FREE = [
    "flows.cli",
    "flows.prepare",
    "flows.train",
    "flows.serve",
    "tasks.cache",
    "tasks.download",
    "tasks.weights",
    "tasks.train",
    "tasks.validate",
    "tasks.report",
    "tasks.promote",
    "tasks.predict",
]


@pytest.mark.parametrize("module", TF_FREE)
def test_only_the_model_module_imports_tensorflow(module):
    probe = f"import sys, {module}; print('tensorflow' in sys.modules, 'tensornets' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
