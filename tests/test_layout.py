"""The house rules that keep stages fast to import and easy to test."""

import subprocess
import sys


def test_data_stages_do_not_import_tensorflow():
    probe = "import sys, flows.cli, flows.prepare, tasks.cache, tasks.download; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
