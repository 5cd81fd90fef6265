"""Pickles from the internet (CIFAR batches, npz weight files): numpy arrays and nothing else.

A pickle can name any callable and have it run on load. Both formats tnflow reads only ever
need numpy's array reconstruction, so everything else is refused before it is imported.
"""

from __future__ import annotations

import pickle


class NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)
