"""`tnflow prepare` as users call it: one line per error, the path as the last line of output."""

import gzip
import hashlib
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import tnflow.flows.prepare as prepare_flow
import tnflow.tasks.sources.download as download
from tests.fakes import cifar_members, make_archive, make_cifar, write_archive
from tnflow.flows.cli.main import main


def prepare(capsys, *options: str) -> tuple[int, list[str], list[str]]:
    code = main(["prepare", *options])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--image-size", "16"], "--image-size must be an integer from 32 to 512, got 16"),
        (["--image-size", "600"], "--image-size must be an integer from 32 to 512, got 600"),
        (["--data-md5", "not-hex"], "--data-md5 'not-hex' is not an md5 digest"),
        (["--valid-size", "0"], "--valid-size must be a number above 0, got 0.0"),
    ],
)
def test_bad_options_fail_before_any_work(capsys, options, message):
    code, out, err = prepare(capsys, *options)
    assert code == 2 and out == [] and len(err) == 1 and message in err[0]


@pytest.mark.parametrize("options", [["--image-size", "big"], ["--dataset", "mnist"], ["--bogus"]])
def test_malformed_options_are_one_line(options):
    with pytest.raises(SystemExit) as raised:
        main(["prepare", *options])
    assert raised.value.code == 2


def test_malformed_option_message():
    done = subprocess.run(
        [sys.executable, "-m", "tnflow.flows.cli.main", "prepare", "--image-size", "big"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tnflow prepare: error: argument --image-size: invalid int value: 'big' (see tnflow prepare --help)"
    ]


def test_debug_starts_tensorflow_unredirected_for_the_commands_that_need_it(monkeypatch, tmp_path):
    import tnflow.tasks.tf.startup as startup
    from tnflow.tasks.core.errors import TnflowError

    calls = []
    monkeypatch.setattr(startup, "start_tensorflow", lambda **kwargs: calls.append(kwargs))
    with pytest.raises(TnflowError):  # --debug: the error itself, with its traceback
        main(["export", str(tmp_path / "no-model"), "--format", "onnx", "--debug"])
    assert calls == [{"verbose": True}], "TensorFlow starts before anything can hide its standard error"
    main(["gc", "--cache-dir", str(tmp_path), "--output-dir", str(tmp_path), "--debug"])
    assert calls == [{"verbose": True}], "tnflow gc needs no TensorFlow"


def test_cache_dir_that_is_not_writable(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, out, err = prepare(capsys, "--cache-dir", str(tmp_path / "file" / "cache"))
    assert code == 1 and out == [] and len(err) == 1 and "is not a writable directory" in err[0]


# -- failures during the run (these start flows on the test server) ----------------------


def _archive_with(tmp_path: Path, change) -> tuple[Path, str]:
    members = cifar_members(make_cifar(n_train=200, n_test=50))
    change(members)
    path = tmp_path / "bad.tar.gz"
    return path, write_archive(path, members)


def _not_gzip(tmp_path):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(b"<html>mirror error page</html>")
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def _not_tar(tmp_path):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(gzip.compress(b"just text"))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def _labels_out_of_range(tmp_path):
    def change(members):
        batch = pickle.loads(members["cifar-10-batches-py/test_batch"], encoding="bytes")
        batch[b"labels"][0] = 42
        members["cifar-10-batches-py/test_batch"] = pickle.dumps(batch, protocol=2)

    return _archive_with(tmp_path, change)


RUN_FAILURES = {
    "not-gzip": (_not_gzip, "is not a readable gzip tar archive"),
    "not-tar": (_not_tar, "is not a readable gzip tar archive"),
    "missing-member": (
        lambda p: _archive_with(p, lambda m: m.pop("cifar-10-batches-py/batches.meta")),
        "lacks cifar-10-batches-py/batches.meta",
    ),
    "corrupt-pickle": (
        lambda p: _archive_with(p, lambda m: m.update({"cifar-10-batches-py/data_batch_1": b"\x80\x02garbage"})),
        "not a valid CIFAR pickle",
    ),
    "labels-out-of-range": (_labels_out_of_range, "label 42 is outside 0..9"),
}


@pytest.mark.parametrize("case", sorted(RUN_FAILURES))
def test_bad_archives_fail_with_one_line(prefect_api, capsys, tmp_path, case):
    make, message = RUN_FAILURES[case]
    path, md5 = make(tmp_path)
    code, out, err = prepare(
        capsys, "--data-url", path.as_uri(), "--data-md5", md5, "--valid-size", "20", "--cache-dir", str(tmp_path / "c")
    )
    assert code == 1 and out == []
    assert err[-1].startswith("tnflow prepare: error:") and message in err[-1]


def test_wrong_digest(prefect_api, capsys, cifar10, tmp_path):
    _, path, md5 = cifar10
    code, out, err = prepare(
        capsys, "--data-url", str(path), "--data-md5", "f" * 32, "--cache-dir", str(tmp_path / "c")
    )
    assert code == 1 and out == [] and f"md5 is {md5} but {'f' * 32} was expected" in err[-1]
    left = [p.name for p in (tmp_path / "c").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == [], "the bad copy is deleted"


def test_not_found(prefect_api, capsys, file_server, tmp_path):
    url = file_server.url("gone.tar.gz")
    code, out, err = prepare(capsys, "--data-url", url, "--cache-dir", str(tmp_path))
    assert code == 1 and out == [] and url in err[-1] and "HTTP 404" in err[-1]


def test_unreachable_host(prefect_api, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_flow, "source_task", download.source_task.with_options(retry_delay_seconds=0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = prepare(capsys, "--data-url", f"http://127.0.0.1:{port}/c.tar.gz", "--cache-dir", str(tmp_path))
    assert code == 1 and out == [] and "cannot connect" in err[-1] and f"127.0.0.1:{port}" in err[-1]


def test_prints_the_cache_path_last(prefect_api, capsys, cifar10, tmp_path):
    _, path, md5 = cifar10
    code, out, err = prepare(
        capsys,
        "--data-url",
        path.as_uri(),
        "--data-md5",
        md5,
        "--image-size",
        "40",
        "--valid-size",
        "50",
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert code == 0, err[-3:]
    cache_file = Path(out[-1])
    assert cache_file.is_absolute() and cache_file.parent == tmp_path / "c"
    with h5py.File(cache_file, "r") as f:
        assert f["train/images"].shape == (450, 40, 40, 3)


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_a_user_error_is_one_line_on_the_console(prefect_api, tmp_path, debug):
    """A truncated archive (its md5 given): tnflow's line, not Prefect's traceback through its engine."""
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=200, n_test=50)
    truncated = (tmp_path / "c10.tar.gz").read_bytes()[:20000]
    (tmp_path / "cut.tar.gz").write_bytes(truncated)
    md5 = hashlib.md5(truncated).hexdigest()
    tnflow = str(Path(sys.executable).with_name("tnflow"))
    command = [tnflow, "prepare", "--data-url", str(tmp_path / "cut.tar.gz"), "--data-md5", md5]
    command += ["--image-size", "32", "--valid-size", "20", "--cache-dir", str(tmp_path / "c")]
    command += ["--debug"] if debug else []
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": prefect_api})
    assert done.returncode == 1 and done.stdout == ""
    if debug:
        assert "Traceback" in done.stderr and "DataError" in done.stderr
    else:
        assert "Traceback" not in done.stderr and "task_engine.py" not in done.stderr, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("tnflow prepare: error: ") and "is not a readable gzip tar archive" in lines[-1]
        assert sum("is not a readable gzip tar archive" in line for line in lines) == 1, "said once"


def test_full_size_cifar10_through_the_console_script(prefect_api, tmp_path):
    """The data stage's acceptance check: a CIFAR-10-sized archive at 64 px, twice."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    fake, md5 = make_archive(archive, n_train=50000, n_test=10000)
    tnflow = str(Path(sys.executable).with_name("tnflow"))  # the installed console script
    command = [
        tnflow,
        "prepare",
        "--data-url",
        archive.as_uri(),
        "--data-md5",
        md5,
        "--image-size",
        "64",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    cache_file = Path(first.stdout.splitlines()[-1])
    with h5py.File(cache_file, "r") as f:
        counts = {s: f[f"{s}/images"].shape[0] for s in ("train", "valid", "test")}
        assert counts == {"train": 45000, "valid": 5000, "test": 10000}
        assert list(f.attrs["class_names"]) == fake.class_names
        assert np.array_equal(f["test/labels"][:], fake.test_labels)
        assert np.bincount(f["valid/labels"][:], minlength=10).tolist() == [500] * 10
        train_and_valid = np.concatenate([f["train/labels"][:], f["valid/labels"][:]])
        assert np.array_equal(np.bincount(train_and_valid), np.bincount(fake.train_labels))

    second = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert second.returncode == 0 and second.stdout.splitlines()[-1] == str(cache_file)
    assert second.stderr.count("Finished in state Cached") == 2, second.stderr[-2000:]


def test_tnflow_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    from tnflow.flows.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"tnflow {version('tnflow')}"
