"""A classifier's classes prepared once per version, for labels given by class position.

A 10,000-row answer would otherwise spend longer comparing and encoding label strings than
the model spends computing them; by position, counting is one bincount and encoding one
gather of values prepared here.
"""

import itertools
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Pre-encoded runs of consecutive labels kept per version: joining runs of several labels
# makes the binary encoding of a big answer several times faster than label by label.
_RUN_ENTRIES = 1024


class ClassLabels:
    def __init__(self, classes: Sequence[str | int]) -> None:
        self.names = [str(c) for c in classes]
        self._values = _objects(list(classes))
        # The V2 binary form of a BYTES element: its length as 4 little-endian bytes, then it.
        encoded = [str(c).encode() for c in classes]
        elements = [struct.pack("<I", len(e)) + e for e in encoded]
        self._elements = _objects(elements)
        # Every run of `length` labels, in the order of the run's number in base len(classes).
        length = 1
        while len(classes) > 1 and len(classes) ** (length + 1) <= _RUN_ENTRIES:
            length += 1
        self._run_length = length
        self._runs = _objects([b"".join(r) for r in itertools.product(elements, repeat=length)])
        self._run_weights = len(classes) ** np.arange(length - 1, -1, -1)

    def counts(self, per_class: NDArray[np.intp]) -> list[tuple[str, int]]:
        """(class name, rows) for each class that occurs, from the rows per class position."""
        return [(name, n) for name, n in zip(self.names, per_class.tolist(), strict=True) if n]

    def values(self, index: NDArray[np.intp]) -> list[Any]:
        """The labels as the JSON values `label.tolist()` would give."""
        result: list[Any] = self._values.take(index.reshape(-1)).tolist()
        return result

    def bytes_elements(self, index: NDArray[np.intp]) -> bytes:
        """The labels as a binary BYTES tensor."""
        flat = index.reshape(-1)
        whole = len(flat) - len(flat) % self._run_length
        runs = flat[:whole].reshape(-1, self._run_length) @ self._run_weights
        parts: list[bytes] = self._runs.take(runs).tolist()
        return b"".join(parts + self._elements.take(flat[whole:]).tolist())


def _objects(items: list[Any]) -> NDArray[np.object_]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array
