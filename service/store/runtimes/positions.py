"""ONNX classifiers made to answer with class positions, so labels cost no Python object per row.

A classifier node (linear, SVM, tree ensemble) keeps its classes in a `classlabels_*`
attribute and writes the chosen class of each row. When the classes are strings, onnxruntime
hands every row's label back as a Python str: on 10,000 rows that costs more than the model.
Given the positions 0..n-1 as its classes instead, the node writes one int64 per row, and the
labels are one gather from the classes; counting and encoding them go by position too.
"""

from collections.abc import Sequence

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

_ML_DOMAIN = "ai.onnx.ml"
# Classifier operators and the attribute that holds integer classes in each.
_INTEGER_CLASSES = {
    "LinearClassifier": "classlabels_ints",
    "SVMClassifier": "classlabels_ints",
    "TreeEnsembleClassifier": "classlabels_int64s",
}
_CLASS_ATTRIBUTES = ("classlabels_strings", "classlabels_ints", "classlabels_int64s")


def _classes_of(node: onnx.NodeProto) -> list[str | int] | None:
    for attribute in node.attribute:
        if attribute.name == "classlabels_strings":
            return [s.decode() for s in attribute.strings]
        if attribute.name in _CLASS_ATTRIBUTES:
            return [int(i) for i in attribute.ints]
    return None


def _typed(classes: Sequence[str | int]) -> list[tuple[type, str | int]]:
    return [(type(c), c) for c in classes]


def positional_graph(
    data: bytes, label_output: int, classes: Sequence[str | int]
) -> tuple[bytes, bool]:
    """The graph, and whether its output number `label_output` gives class positions.

    It does when a classifier node writes that output directly, nothing else reads it, and the
    node's classes are `classes` in the same order: then the node is given the positions as its
    classes (unless they already are), and the output's type becomes INT64. Any other graph is
    returned unchanged.
    """
    try:
        model = onnx.load_from_string(data)
    except DecodeError:
        return data, False  # the session, loading it next, says what is wrong with it
    graph = model.graph
    if not 0 <= label_output < len(graph.output):
        return data, False
    output = graph.output[label_output]
    writers = [n for n in graph.node if output.name in n.output]
    readers = [n for n in graph.node if output.name in n.input]
    if len(writers) != 1 or readers:
        return data, False
    node = writers[0]
    if node.domain != _ML_DOMAIN or node.op_type not in _INTEGER_CLASSES:
        return data, False
    found = _classes_of(node)
    # Compared with their types: 0 == 0.0 == False, but their labels differ.
    if node.output[0] != output.name or found is None or _typed(found) != _typed(classes):
        return data, False
    positions = list(range(len(classes)))
    if _typed(found) == _typed(positions):
        return data, True
    for attribute in [a for a in node.attribute if a.name in _CLASS_ATTRIBUTES]:
        node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute(_INTEGER_CLASSES[node.op_type], positions))
    output.type.tensor_type.elem_type = TensorProto.INT64
    return model.SerializeToString(), True
