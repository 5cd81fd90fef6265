"""Pretrained weights: verified fetch through the shared downloader, strict shape checks."""

import pytest

from tests.fake_weights import write_fake_weights
from tnflow.tasks.errors import DataError, DownloadError
from tnflow.tasks.weights import PRETRAINED, check_weights, fetch_weights, needed_layers, resolve

VGG19 = PRETRAINED["vgg19"].layers


def test_vgg19_registry_matches_the_published_file():
    assert PRETRAINED["vgg19"].md5 == "cbe5617147190e668d6c5d5026f83318"
    assert PRETRAINED["vgg19"].url.endswith("vgg19_weights_tf_dim_ordering_tf_kernels.h5")
    assert len(VGG19) == 19 and sum(len(s) for _, s in VGG19) == 38
    assert [name for name, _ in needed_layers("vgg19", "gap")][-1] == "block5_conv4"
    assert [name for name, _ in needed_layers("vgg19", "full")][-1] == "fc2"


def test_served_weights_are_verified_and_checked(file_server, tmp_path):
    md5 = write_fake_weights(tmp_path / "w.h5", VGG19[:16])
    file_server.files["w.h5"] = (tmp_path / "w.h5").read_bytes()
    found = fetch_weights(file_server.url("w.h5"), md5, "vgg19", "gap", tmp_path / "cache")
    assert found.md5 == md5 and found.path.startswith(str(tmp_path / "cache"))


def test_wrong_digest(file_server, tmp_path):
    md5 = write_fake_weights(tmp_path / "w.h5", VGG19[:16])
    file_server.files["w.h5"] = (tmp_path / "w.h5").read_bytes()
    with pytest.raises(DownloadError, match=f"md5 is {md5} but {'0' * 32} was expected"):
        fetch_weights(file_server.url("w.h5"), "0" * 32, "vgg19", "gap", tmp_path / "cache")


def test_none_means_random_on_purpose(tmp_path):
    found = fetch_weights("none", None, "vgg19", "full", tmp_path)
    assert found.path is None and found.source == "none"


@pytest.mark.parametrize(
    "layers, head, message",
    [
        (VGG19[:10], "gap", "stops after 10 layers; vgg19 needs block4_conv3"),
        (VGG19[:16], "full", "stops after 16 layers; vgg19 needs fc1"),
        ([*VGG19[:2], ("block2_conv1", ((3, 3, 64, 99), (99,))), *VGG19[3:16]], "gap", r"block2_conv1 has shapes"),
    ],
    ids=["truncated", "no-fc-for-full-head", "wrong-shape"],
)
def test_files_that_do_not_fit_the_model(tmp_path, layers, head, message):
    write_fake_weights(tmp_path / "w.h5", layers)
    with pytest.raises(DataError, match=message):
        check_weights(tmp_path / "w.h5", "vgg19", head)


def test_not_a_keras_file(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable Keras weights file"):
        check_weights(tmp_path / "w.h5", "vgg19", "gap")


def test_a_local_copy_under_the_published_name_must_be_the_published_file(tmp_path):
    published = PRETRAINED["vgg19"].url.rsplit("/", 1)[1]
    write_fake_weights(tmp_path / published, VGG19[:16])  # right layout, wrong bytes
    assert resolve(str(tmp_path / published), None, "vgg19") == (str(tmp_path / published), PRETRAINED["vgg19"].md5)
    with pytest.raises(DownloadError, match=f"but {PRETRAINED['vgg19'].md5} was expected"):
        fetch_weights(str(tmp_path / published), None, "vgg19", "gap", tmp_path / "cache")


def test_another_local_file_gets_the_shape_check_and_says_so(tmp_path):
    write_fake_weights(tmp_path / "mine.h5", VGG19[:16])
    found = fetch_weights(str(tmp_path / "mine.h5"), None, "vgg19", "gap", tmp_path / "cache")
    assert found.check.startswith("every layer's shape") and "no digest" in found.check
    write_fake_weights(tmp_path / "short.h5", VGG19[:9])
    with pytest.raises(DataError, match="stops after 9 layers"):
        fetch_weights(str(tmp_path / "short.h5"), None, "vgg19", "gap", tmp_path / "cache")


def test_a_given_digest_is_checked_and_named(tmp_path):
    md5 = write_fake_weights(tmp_path / "mine.h5", VGG19[:16])
    found = fetch_weights(str(tmp_path / "mine.h5"), md5, "vgg19", "gap", tmp_path / "cache")
    assert found.check == f"md5 {md5} and every layer's shape"
