"""Running `tnflow run` as a user would, and killing it the ways machines and schedulers do."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import stop_process_group
from tests.fakes import make_archive

TNFLOW = str(Path(sys.executable).with_name("tnflow"))


def small_cifar(root: Path) -> tuple[Path, str]:
    """A fake CIFAR-10 archive of 200 training and 40 test images, and its md5."""
    _, md5 = make_archive(root / "c10.tar.gz", n_train=200, n_test=40)
    return root / "c10.tar.gz", md5


# Long enough for a run that lost its server to be still training when it notices (about 15
# epochs after the loss at about 1 s each); short enough to finish after a resume (the finishing
# runs were most of the killing tests' 2 minutes at 60). A test that only kills passes fewer.
EPOCHS = 30


def run_command(cifar, out: Path, cache: Path, slot: str, epochs: int = EPOCHS) -> list[str]:
    archive, md5 = cifar
    command = [TNFLOW, "run", "--data-url", str(archive), "--data-md5", md5, "--model", "mobilenet35v2"]
    command += ["--weights", "none", "--image-size", "32", "--valid-size", "40", "--epochs", str(epochs)]
    command += ["--export", "none", "--no-promote", "--cache-dir", str(cache), "--output-dir", str(out)]
    return [*command, "--gpu-slot", slot]


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(log: Path, pattern: str, process: subprocess.Popen, seconds: float = 240) -> re.Match:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert process.poll() is None, f"exited {process.returncode} before {pattern!r}: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {seconds} s: {log.read_text()[-3000:]}")


def finish(process: subprocess.Popen, log: Path, seconds: float = 300) -> str:
    try:
        process.wait(timeout=seconds)
    finally:
        stop_process_group(process)
    return log.read_text(errors="replace")


def sigkill_leaving_nothing(process: subprocess.Popen) -> None:
    """SIGKILL the tnflow process alone (not its group): its children must go by themselves."""
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "a temporary server or workers were running"
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
