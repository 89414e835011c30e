"""The Runtime seam and the table that picks a runtime module by artifact suffix."""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from service.store.metadata import ArtifactMetadata, Task
from service.store.tensors import TensorSpec

Arrays = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class Prediction:
    """What one model call returns: its named outputs, first axis rows."""

    outputs: Arrays
    # Each row's position in signature.classes, when the runtime knows it for free: with it,
    # labels are counted and encoded per class instead of string by string.
    label_index: NDArray[np.intp] | None = None
    # Rows per class position, counted once for both the label metrics and the drift window.
    _class_counts: dict[int, NDArray[np.intp]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def class_counts(self, classes: int) -> NDArray[np.intp]:
        """How many rows each of the first `classes` class positions has (label_index set)."""
        counts = self._class_counts.get(classes)
        if counts is None:
            assert self.label_index is not None
            counts = np.bincount(self.label_index.reshape(-1), minlength=classes)
            self._class_counts[classes] = counts
        return counts

    def rows(self, start: int, stop: int) -> "Prediction":
        """The rows [start, stop) of every output, for one request of a merged batch."""
        index = self.label_index
        return Prediction(
            {name: array[start:stop] for name, array in self.outputs.items()},
            None if index is None else index[start:stop],
        )


@dataclass(frozen=True)
class Signature:
    """What a model takes and returns, as read from metadata or inferred from the artifact."""

    task: Task
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    features: list[str] = field(default_factory=list)
    classes: list[str | int] | None = None


class Runtime(Protocol):
    """A loaded model: one call, named arrays in, named arrays out, first axis is rows."""

    format: str
    signature: Signature

    def predict(self, inputs: Arrays) -> Prediction: ...


class RuntimeModule(Protocol):
    def load(
        self, data: bytes, metadata: ArtifactMetadata | None, options: "RuntimeOptions"
    ) -> Runtime: ...

    def describe(self, data: bytes) -> Signature: ...

    def framework_versions(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class RuntimeOptions:
    strict_versions: bool = False
    onnx_intra_op_threads: int = 1
    onnx_inter_op_threads: int = 1
    # The model version being loaded: what its calls warn is reported under its name.
    model: tuple[str, int] | None = None


# Artifact suffix -> module; imported only when an artifact of that kind is loaded.
RUNTIME_MODULES = {
    ".onnx": "service.store.runtimes.onnx",
    ".joblib": "service.store.runtimes.sklearn",
    ".pkl": "service.store.runtimes.sklearn",
}


def runtime_module(artifact: Path) -> RuntimeModule:
    module: Any = importlib.import_module(RUNTIME_MODULES[artifact.suffix])
    return module  # type: ignore[no-any-return]  # a module cannot be typed as a Protocol


def signature_of(metadata: ArtifactMetadata) -> Signature:
    return Signature(
        task=metadata.task,
        inputs=metadata.inputs,
        outputs=metadata.outputs,
        features=metadata.features,
        classes=metadata.classes,
    )
