"""Pretrained weights: verified fetch through the shared downloader, strict checks against the graph."""

from pathlib import Path

import pytest

from tests.fake_weights import VGG_CONV, fake_arrays, write_fake_weights, write_weights
from tnflow.tasks.config.backbones import BACKBONES
from tnflow.tasks.core.errors import DataError, DownloadError
from tnflow.tasks.training.weights import fetch_weights, resolve

VGG19 = BACKBONES["vgg19"]


def test_the_table_holds_the_files_tensornets_fetches():
    import sys

    from tnflow.tasks.tf.tensornets_compat import nets  # noqa: F401 - imports tensornets.pretrained

    assert VGG19.weights_md5 == "cbe5617147190e668d6c5d5026f83318"
    assert VGG19.weights_url.endswith("vgg/vgg19_weights_tf_dim_ordering_tf_kernels.h5")
    source = Path(sys.modules["tensornets.pretrained"].__file__).read_text()
    for backbone in BACKBONES.values():  # each URL's file name and digest, as tensornets' loader has them
        name = backbone.weights_url.rsplit("/", 1)[1]
        assert f"filename = '{name}'" in source and f"file_hash='{backbone.weights_md5}'" in source, backbone.name


def test_served_weights_are_verified_and_checked(file_server, tmp_path):
    md5 = write_fake_weights(tmp_path / "w.h5", "vgg19", count=VGG_CONV)
    file_server.files["w.h5"] = (tmp_path / "w.h5").read_bytes()
    found = fetch_weights(file_server.url("w.h5"), md5, "vgg19", "gap", tmp_path / "cache")
    assert found.md5 == md5 and found.path.startswith(str(tmp_path / "cache"))
    assert found.check == f"md5 {md5} and every variable's shape"


def test_wrong_digest(file_server, tmp_path):
    md5 = write_fake_weights(tmp_path / "w.h5", "vgg19", count=VGG_CONV)
    file_server.files["w.h5"] = (tmp_path / "w.h5").read_bytes()
    with pytest.raises(DownloadError, match=f"md5 is {md5} but {'0' * 32} was expected.*\\(--weights-md5\\)$"):
        fetch_weights(file_server.url("w.h5"), "0" * 32, "vgg19", "gap", tmp_path / "cache")


def test_weights_that_cannot_be_fetched_name_the_options_that_fix_it(tmp_path, monkeypatch):
    import socket
    import urllib.request

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DownloadError) as raised:
        fetch_weights("https://example.invalid/w.h5", None, "vgg19", "gap", tmp_path / "cache")
    assert str(raised.value).endswith("with --weights, or --weights none to start from random weights")
    with pytest.raises(DownloadError, match=r"no such file; check the path given to --weights$"):
        fetch_weights(str(tmp_path / "missing.h5"), None, "vgg19", "gap", tmp_path / "cache")


def test_none_means_random_on_purpose(tmp_path):
    found = fetch_weights("none", None, "vgg19", "full", tmp_path)
    assert found.path is None and found.source == "none"


@pytest.mark.parametrize(
    "cut, head, message",
    [
        (20, "gap", "stops after 20 arrays; vgg19 needs vgg19/conv4/3/conv/weights"),
        (32, "full", "stops after 32 arrays; vgg19 needs vgg19/fc6/weights"),
    ],
    ids=["truncated", "no-fc-for-full-head"],
)
def test_files_that_do_not_fit_the_model_fail_at_fetch(tmp_path, cut, head, message):
    write_weights(tmp_path / "w.h5", "keras", fake_arrays("vgg19", count=cut))
    with pytest.raises(DataError, match=message):
        fetch_weights(str(tmp_path / "w.h5"), None, "vgg19", head, tmp_path / "cache")


def test_a_file_of_another_model_names_the_first_misfit(tmp_path):
    write_fake_weights(tmp_path / "resnet.h5", "resnet50")
    with pytest.raises(DataError, match=r"array 0 .* vgg19 needs \[3, 3, 3, 64\] for vgg19/conv1/1/conv/weights"):
        fetch_weights(str(tmp_path / "resnet.h5"), None, "vgg19", "gap", tmp_path / "cache")


def test_not_a_weights_file(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable Keras HDF5 weights file"):
        fetch_weights(str(tmp_path / "w.h5"), None, "vgg19", "gap", tmp_path / "cache")
    (tmp_path / "w.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable tensornets \.npz weights file"):
        fetch_weights(str(tmp_path / "w.npz"), None, "mobilenet35v2", "gap", tmp_path / "cache")


def test_a_local_copy_under_the_published_name_must_be_the_published_file(tmp_path):
    published = VGG19.weights_url.rsplit("/", 1)[1]
    write_fake_weights(tmp_path / published, "vgg19", count=VGG_CONV)  # right layout, wrong bytes
    assert resolve(str(tmp_path / published), None, "vgg19") == (str(tmp_path / published), VGG19.weights_md5)
    with pytest.raises(DownloadError, match=f"but {VGG19.weights_md5} was expected"):
        fetch_weights(str(tmp_path / published), None, "vgg19", "gap", tmp_path / "cache")


def test_another_local_file_gets_the_shape_check_and_says_so(tmp_path):
    write_fake_weights(tmp_path / "mine.npz", "mobilenet35v2")
    found = fetch_weights(str(tmp_path / "mine.npz"), None, "mobilenet35v2", "gap", tmp_path / "cache")
    assert found.check.startswith("every variable's shape") and "no digest" in found.check
