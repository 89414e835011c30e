"""ONNX models through onnxruntime: scikit-learn exports and general graphs."""

import platform
from itertools import repeat
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.errors import ModelLoadError
from service.store.metadata import ArtifactMetadata
from service.store.runtimes import (
    Arrays,
    Prediction,
    Runtime,
    RuntimeOptions,
    Signature,
    signature_of,
)
from service.store.runtimes.positions import positional_graph
from service.store.tensors import TensorSpec

_ONNX_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64",
    "tensor(uint32)": "UINT32",
    "tensor(uint16)": "UINT16",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def framework_versions() -> dict[str, str]:
    import onnx  # only packaging and graphs without metadata need it: loading one starts sooner

    return {
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def _session(data: bytes, options: RuntimeOptions) -> Any:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.onnx_intra_op_threads
    session_options.inter_op_num_threads = options.onnx_inter_op_threads
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(data, session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for bad graphs
        raise ModelLoadError(
            f"onnxruntime cannot load the graph: {exc}", reason="corrupt_artifact"
        ) from exc


def _spec(arg: Any) -> TensorSpec:
    datatype = _ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(
            f"ONNX tensor {arg.name!r} has unsupported type {arg.type}",
            reason="unsupported_artifact",
        )
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def _class_labels(data: bytes) -> list[str | int] | None:
    """Class labels that skl2onnx stores in its classifier nodes, if any."""
    import onnx

    graph = onnx.load_from_string(data).graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "classlabels_strings":
                return [s.decode() for s in attribute.strings]
            # TreeEnsembleClassifier names its integer classes so; LinearClassifier and
            # SVMClassifier name them `classlabels_ints`.
            if attribute.name in ("classlabels_int64s", "classlabels_ints"):
                return list(attribute.ints)
    return None


def describe(data: bytes) -> Signature:
    session = _session(data, RuntimeOptions())
    inputs = [_spec(i) for i in session.get_inputs()]
    outputs = [_spec(o) for o in session.get_outputs()]
    names = {o.name for o in outputs}
    if {"label", "probabilities"} <= names:
        return Signature("classification", inputs, outputs, [], _class_labels(data))
    return Signature("other", inputs, outputs)


class OnnxRuntime:
    format = "onnx"

    def __init__(self, session: Any, signature: Signature, positional: bool = False) -> None:
        self._session = session
        self.signature = signature
        graph_outputs = [o.name for o in session.get_outputs()]
        graph_inputs = [i.name for i in session.get_inputs()]
        if len(graph_inputs) != len(signature.inputs) or len(graph_outputs) != len(
            signature.outputs
        ):
            raise ModelLoadError(
                "metadata.json does not match the ONNX graph's inputs and outputs",
                reason="bad_metadata",
            )
        # Signature names may differ from graph names (canonical "prediction" vs the export's);
        # tensors correspond by position, worked out once here rather than per call.
        self._inputs = list(zip(graph_inputs, (s.name for s in signature.inputs), strict=True))
        self._graph_outputs = graph_outputs
        self._outputs = [
            (spec.name, len(spec.shape), spec.datatype == "BYTES") for spec in signature.outputs
        ]
        classes = signature.classes if signature.task == "classification" else None
        # The graph's label output gives class positions (see positions.py): labels are
        # gathered from the classes.
        self._positional = positional and classes is not None
        # Classes 0..n-1 are their own positions: the labels need no gather.
        self._gather = classes != list(range(len(classes or [])))
        # Else string class labels are looked up once per row, giving each label's position.
        self._positions: dict[Any, int] | None = None
        if classes and all(isinstance(c, str) for c in classes):
            self._positions = {c: i for i, c in enumerate(classes)}
            self._classes: NDArray[Any] = np.asarray(classes, dtype=np.str_)
        elif classes:
            self._classes = np.asarray(classes)

    def predict(self, inputs: Arrays) -> Prediction:
        feed = {graph: inputs[name] for graph, name in self._inputs}
        results = self._session.run(self._graph_outputs, feed)
        arrays: Arrays = {}
        label_index: NDArray[np.intp] | None = None
        for (name, rank, strings), value in zip(self._outputs, results, strict=True):
            array = np.asarray(value)
            # Exports give regressors a [N, 1] output; the canonical tensor is [N].
            if rank == 1 and array.ndim == 2 and array.shape[1] == 1:
                array = array[:, 0]
            if name == "label" and self._positional:
                label_index = array.astype(np.intp, copy=False)
                array = self._classes.take(label_index) if self._gather else array
            elif strings and array.dtype == object:
                # onnxruntime returns str objects; a fixed-width str array, as scikit-learn
                # gives, is counted and encoded with array operations instead of Python loops.
                index = self._class_index(array) if name == "label" else None
                if index is not None:
                    label_index = index
                    array = self._classes.take(index)
                else:
                    array = array.astype(np.str_)
            arrays[name] = array
        return Prediction(arrays, label_index)

    def _class_index(self, label: NDArray[np.object_]) -> NDArray[np.intp] | None:
        """Each label's position among the classes; None if one is not a known class."""
        if self._positions is None or label.ndim != 1:
            return None
        found = map(self._positions.get, label.tolist(), repeat(-1))
        index = np.fromiter(found, dtype=np.intp, count=len(label))
        return index if len(index) == 0 or index.min() >= 0 else None


def load(data: bytes, metadata: ArtifactMetadata | None, options: RuntimeOptions) -> Runtime:
    signature = signature_of(metadata) if metadata else describe(data)
    names = [spec.name for spec in signature.outputs]
    positional = False
    if signature.task == "classification" and signature.classes and "label" in names:
        data, positional = positional_graph(data, names.index("label"), signature.classes)
    return OnnxRuntime(_session(data, options), signature, positional)
