"""scikit-learn models exported to ONNX by skl2onnx: recognised and given the canonical tensors.

skl2onnx records itself as the graph's producer and names the tensors its own way (input `X`,
outputs `label`/`probabilities`, `output_label`/`output_probability` or `variable`). The
canonical names go into metadata.json; the ONNX runtime pairs them with the graph's by position.
"""

from collections import deque
from typing import Any

import onnx
from onnx import numpy_helper

from service.errors import InvalidInput
from service.store.runtimes import Signature
from service.store.tensors import TensorSpec, datatype_of

PRODUCER = "skl2onnx"
ZIPMAP_FIX = (
    "export with zipmap disabled: "
    'to_onnx(model, X, options={id(model): {"zipmap": False}}), '
    'or options={"zipmap": False} when the model is the classifier itself'
)
_CLASS_ATTRIBUTES = ("classlabels_strings", "classlabels_int64s", "classlabels_ints")


def describe_export(data: bytes) -> Signature | None:
    """The canonical signature of a skl2onnx classifier or regressor; None for other graphs."""
    model = onnx.load_from_string(data)
    graph = model.graph
    _refuse_zipmap(graph)
    if model.producer_name != PRODUCER:
        return None
    constants = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or _rank(inputs[0]) != 2 or _datatype(inputs[0]) == "BYTES":
        return None
    features = TensorSpec(
        name="input", datatype=_datatype(inputs[0]), shape=[-1, _width(inputs[0])]
    )
    outputs = list(graph.output)
    if len(outputs) == 1 and _is_single_value(outputs[0]):
        prediction = TensorSpec(name="prediction", datatype=_datatype(outputs[0]), shape=[-1])
        return Signature("regression", [features], [prediction])
    if len(outputs) == 2 and _rank(outputs[0]) == 1 and _rank(outputs[1]) == 2:
        classes = _class_labels(graph, outputs[0].name)
        width = _width(outputs[1])
        # A graph without class labels (k-means: label and distances) is not a classifier.
        if classes is None or width not in (-1, len(classes)):
            return None
        return Signature(
            "classification",
            [features],
            [
                TensorSpec(name="label", datatype=_datatype(outputs[0]), shape=[-1]),
                TensorSpec(
                    name="probabilities", datatype=_datatype(outputs[1]), shape=[-1, len(classes)]
                ),
            ],
            classes=classes,
        )
    return None


def _refuse_zipmap(graph: onnx.GraphProto) -> None:
    for output in graph.output:
        sequence = output.type.sequence_type
        if output.type.HasField("sequence_type") and sequence.elem_type.HasField("map_type"):
            raise InvalidInput(
                f"output {output.name!r} is a ZipMap (a sequence of maps, one per row), which "
                f"cannot be served as a tensor; {ZIPMAP_FIX}"
            )


def _rank(value: onnx.ValueInfoProto) -> int:
    if not value.type.HasField("tensor_type"):
        return -1
    return len(value.type.tensor_type.shape.dim)


def _width(value: onnx.ValueInfoProto) -> int:
    last = value.type.tensor_type.shape.dim[-1]
    return last.dim_value if last.HasField("dim_value") else -1


def _datatype(value: onnx.ValueInfoProto) -> str:
    elem_type = value.type.tensor_type.elem_type
    return datatype_of(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _is_single_value(value: onnx.ValueInfoProto) -> bool:
    """A regressor's output: one float per row, as [N] or [N, 1]."""
    rank = _rank(value)
    single = rank == 1 or (rank == 2 and _width(value) == 1)
    return single and _datatype(value) in ("FP16", "FP32", "FP64")


def _class_labels(graph: onnx.GraphProto, label: str) -> list[str | int] | None:
    """The labels the graph's label output is drawn from, nearest to that output first.

    Linear, SVM and tree classifiers keep them in a `classlabels_*` attribute; the others
    (k-NN, naive Bayes, MLP) look the label up in a constant with ArrayFeatureExtractor.
    """
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {i.name: i for i in graph.initializer}
    pending, seen = deque([label]), set()
    while pending:
        name = pending.popleft()
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        for attribute in node.attribute:
            if attribute.name == "classlabels_strings":
                return [s.decode() for s in attribute.strings]
            if attribute.name in _CLASS_ATTRIBUTES:
                return [int(i) for i in attribute.ints]
        if node.op_type == "ArrayFeatureExtractor":
            table = _constant(node.input[0], initializers, producers)
            if table is not None:
                return table
        pending.extend(node.input)
    return None


def _constant(
    name: str, initializers: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> list[str | int] | None:
    tensor = initializers.get(name)
    node = producers.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = next((a.t for a in node.attribute if a.name == "value"), None)
    if tensor is None:
        return None
    values: list[Any] = numpy_helper.to_array(tensor).ravel().tolist()
    return [
        v.decode() if isinstance(v, bytes) else v if isinstance(v, str) else int(v) for v in values
    ]
