"""tensornets 0.4.6 on TensorFlow 2.16+: everything it needs that TensorFlow no longer ships.

tensornets imports `decode_predictions` from `tensorflow.python.keras.applications.imagenet_utils`
and `get_file` from `tensorflow.python.keras.utils.data_utils`; TensorFlow 2.16+ dropped the
first module (and some builds the second). Nothing else on VGG19's path needs them, so we
register small stand-ins before the import. `get_file` is tensornets' downloader: tnflow
fetches and verifies weights itself, so the stand-in refuses to download anything. tensornets
also imports `distutils`, which Python 3.12 removed; the `setuptools` dependency provides it.

Import `tensornets` from here (`from tasks.tensornets_compat import nets`); only
`tasks/model.py` does.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import tensorflow as tf  # noqa: F401 - must be importable before tensornets


def _refuse_download(fname: str, origin: str = "", *args: object, **kwargs: object) -> str:
    raise RuntimeError(
        f"tensornets tried to download {origin or fname}; tnflow loads verified weights itself "
        "(use --weights PATH_OR_URL)"
    )


def _decode_predictions(*args: object, **kwargs: object) -> object:
    from keras.applications.imagenet_utils import decode_predictions

    return decode_predictions(*args, **kwargs)


def _provide(name: str, **attributes: object) -> None:
    if _exists(name):
        return
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


_provide("tensorflow.python.keras.applications")
_provide("tensorflow.python.keras.applications.imagenet_utils", decode_predictions=_decode_predictions)
_provide("tensorflow.python.keras.utils.data_utils", get_file=_refuse_download)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import tensornets as nets

# tensornets' legacy layers warn on every graph build that Keras 3 will drop them; we pin both.
warnings.filterwarnings("ignore", message=r".*`(layer\.apply|tf\.layers\.\w+)` is deprecated", category=UserWarning)

nets.utils.get_file = _refuse_download
nets.pretrained.get_file = _refuse_download

__all__ = ["nets"]
