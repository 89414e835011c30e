"""A classifier's classes prepared once per version, for labels given by class position.

A 10,000-row answer would otherwise spend longer comparing and encoding label strings than
the model spends computing them; by position, counting is one bincount and encoding one
gather of values prepared here.
"""

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray


class ClassLabels:
    def __init__(self, classes: Sequence[str | int]) -> None:
        self.names = [str(c) for c in classes]
        self._values = _objects(list(classes))
        # The V2 binary form of a BYTES element: its length as 4 little-endian bytes, then it.
        encoded = [str(c).encode() for c in classes]
        self._elements = _objects([struct.pack("<I", len(e)) + e for e in encoded])

    def counts(self, index: NDArray[np.intp]) -> list[tuple[str, int]]:
        """(class name, rows) for each class that occurs."""
        counts = np.bincount(index.reshape(-1), minlength=len(self.names)).tolist()
        return [(name, n) for name, n in zip(self.names, counts, strict=True) if n]

    def values(self, index: NDArray[np.intp]) -> list[Any]:
        """The labels as the JSON values `label.tolist()` would give."""
        result: list[Any] = self._values.take(index.reshape(-1)).tolist()
        return result

    def bytes_elements(self, index: NDArray[np.intp]) -> bytes:
        """The labels as a binary BYTES tensor."""
        return b"".join(self._elements.take(index.reshape(-1)).tolist())


def _objects(items: list[Any]) -> NDArray[np.object_]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array
