"""The zoo as a table: every backbone tnflow offers, its pretrained file and how to feed it.

Everything tnflow knows about a backbone is one row here; the code that builds, feeds, loads
and lists networks reads the row and has no per-model branches. The URLs and md5 digests
are the ones tensornets 0.4.6 fetches (`tensornets/pretrained.py`), so `--weights imagenet`
gets the file tensornets would, verified against the digest tensornets publishes. ImageNet
top-1 is from tensornets' own table (single 224 or 299 crop); the parameter count is of the
whole 1000-class network, BN statistics included (the figure Keras prints), and a test
checks it against the built graph.

A leaf module: no TensorFlow, nothing of tnflow, so the configuration can list the models.
"""

from __future__ import annotations

from dataclasses import dataclass

_RELEASES = "https://github.com/taehoonlee/deep-learning-models/releases/download/"

# How each family's ImageNet weights expect their input, from uint8 RGB 0-255
# (tensornets' numpy `preprocess` for the model; `tasks/tf/network.py` writes them as graph ops).
PREPROCESSING = {
    "caffe": "caffe: RGB to BGR, minus ImageNet channel means B 103.939 G 116.779 R 123.68, on 0-255",
    "torch": "torch: /255, minus mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225), RGB",
    "tf": "tf: /255, scaled to [-1, 1], RGB",
}


@dataclass(frozen=True)
class Backbone:
    """One row of the zoo."""

    name: str  # --model
    net: str  # the tensornets constructor
    preprocessing: str  # a key of PREPROCESSING
    image_size: int  # the size its ImageNet weights were trained at: the default --image-size
    min_size: int  # the smallest input its layers accept
    top1: float  # ImageNet top-1 %, tensornets' table
    params: int  # every variable of the 1000-class network
    weights_url: str
    weights_md5: str  # as published in tensornets' pretrained.py
    weights_format: str  # "keras" (HDF5, layer_names) or "npz" (names + values arrays)
    full_head: bool = False  # has classifier layers worth keeping (VGG's fc6/fc7)
    batch_norm: bool = True  # has BN layers (VGG has none)

    @property
    def weights_check(self) -> str:
        return "md5 (published by tensornets) and every variable's shape"


def _row(name, net, pre, size, min_size, top1, params, path, md5, fmt, full=False) -> Backbone:
    # The networks with a full head worth keeping are VGG's, the only ones without batch normalisation.
    return Backbone(name, net, pre, size, min_size, top1, params, _RELEASES + path, md5, fmt, full, not full)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _row("vgg16", "VGG16", "caffe", 224, 32, 71.268, 138_357_544,
             "vgg/vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b", "keras", True),
        _row("vgg19", "VGG19", "caffe", 224, 32, 71.256, 143_667_240,
             "vgg/vgg19_weights_tf_dim_ordering_tf_kernels.h5", "cbe5617147190e668d6c5d5026f83318", "keras", True),
        _row("resnet50", "ResNet50", "caffe", 224, 32, 74.874, 25_636_712,
             "resnet/resnet50.h5", "9df0843bdadb58ed24d360564c45b119", "keras"),
        _row("resnet101", "ResNet101", "caffe", 224, 32, 76.420, 44_707_176,
             "resnet/resnet101.h5", "e2434bec605870fb4747e1b93f9f0e47", "keras"),
        _row("resnet50v2", "ResNet50v2", "tf", 299, 32, 75.960, 25_613_800,
             "resnet/resnet_v2_50.npz", "fa2ac006361fd5e79792d163c0130667", "npz"),
        _row("densenet121", "DenseNet121", "torch", 224, 32, 74.972, 8_062_504,
             "densenet/densenet121.npz", "c65564d54d4f7d29da6c84865325d7d4", "npz"),
        _row("mobilenet100v2", "MobileNet100v2", "tf", 224, 32, 71.336, 3_538_984,
             "mobilenet/mobilenet_v2_100_224.npz", "ea55ba8d51df1df59b196d2508a3f262", "npz"),
        _row("mobilenet35v2", "MobileNet35v2", "tf", 224, 32, 60.086, 1_691_208,
             "mobilenet/mobilenet_v2_035_224.npz", "cf758f7f8024d39365e553ec924bb395", "npz"),
        _row("efficientnetb0", "EfficientNetB0", "torch", 224, 32, 77.012, 5_330_564,
             "efficientnet/efficientnetb0.npz", "32aaa7fec51d344765bf41244212e519", "npz"),
        _row("inception3", "Inception3", "tf", 299, 75, 77.946, 23_851_784,
             "inception/inception3.npz", "546b76313eb0fd8037ae5108c850c9e9", "npz"),
    )
}  # fmt: skip

MODELS = tuple(BACKBONES)
