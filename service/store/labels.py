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


class _Runs:
    """One encoding of labels: each class's, and every run of `length` of them, in the order
    of the run's number in base len(classes)."""

    def __init__(self, elements: list[bytes]) -> None:
        self.elements = _objects(elements)
        self.first = elements
        length = 1
        while len(elements) > 1 and len(elements) ** (length + 1) <= _RUN_ENTRIES:
            length += 1
        self.length = length
        self.runs = _objects([b"".join(r) for r in itertools.product(elements, repeat=length)])
        self.weights = len(elements) ** np.arange(length - 1, -1, -1)

    def join(self, index: NDArray[np.intp]) -> bytes:
        flat = index.reshape(-1)
        if len(flat) == 1:  # one row: no arrays to build
            return self.first[int(flat[0])]
        whole = len(flat) - len(flat) % self.length
        runs = flat[:whole].reshape(-1, self.length) @ self.weights
        parts: list[bytes] = self.runs.take(runs).tolist()
        return b"".join(parts + self.elements.take(flat[whole:]).tolist())


class ClassLabels:
    def __init__(self, classes: Sequence[str | int]) -> None:
        self.names = [str(c) for c in classes]
        self._values = _objects(list(classes))
        encoded = [str(c).encode() for c in classes]
        # The V2 binary form of a BYTES element: its length as 4 little-endian bytes, then it.
        self._binary = _Runs([struct.pack("<I", len(e)) + e for e in encoded])
        # The protobuf form: an InferTensorContents bytes_contents field (8, length-delimited).
        self._protobuf = _Runs([b"\x42" + varint(len(e)) + e for e in encoded])

    def counts(self, per_class: NDArray[np.intp]) -> list[tuple[str, int]]:
        """(class name, rows) for each class that occurs, from the rows per class position."""
        return [(name, n) for name, n in zip(self.names, per_class.tolist(), strict=True) if n]

    def values(self, index: NDArray[np.intp]) -> list[Any]:
        """The labels as the JSON values `label.tolist()` would give."""
        result: list[Any] = self._values.take(index.reshape(-1)).tolist()
        return result

    def bytes_elements(self, index: NDArray[np.intp]) -> bytes:
        """The labels as a binary BYTES tensor."""
        return self._binary.join(index)

    def protobuf_elements(self, index: NDArray[np.intp]) -> bytes:
        """The labels as the bytes_contents of an InferTensorContents message, encoded."""
        return self._protobuf.join(index)


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    """A protobuf varint (non-negative values)."""
    if value < 0x80:  # most lengths and sizes of a small answer
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _objects(items: list[Any]) -> NDArray[np.object_]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array
