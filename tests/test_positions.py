"""ONNX classifiers answer with class positions: the same labels, and each label's position."""

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import helper
from skl2onnx import to_onnx
from sklearn import datasets
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from service.store.packaging import package_artifact
from service.store.registry import LoadOptions, ModelVersion, load_version

IRIS = datasets.load_iris()
X = np.asarray(IRIS.data, dtype=np.float32)
NAMES = np.asarray(IRIS.target_names)[IRIS.target]
# Rows the models did not see, some of them far outside the training data.
ROWS = np.random.default_rng(0).normal(4.0, 3.0, size=(2_000, 4)).astype(np.float32)

ESTIMATORS: dict[str, Callable[[], Any]] = {
    "linear": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    "tree": lambda: DecisionTreeClassifier(random_state=0),
    "forest": lambda: RandomForestClassifier(n_estimators=10, random_state=0),
    "svm": lambda: SVC(random_state=0),
}
TARGETS: dict[str, NDArray[Any]] = {
    "names": NAMES,
    "binary names": np.where(IRIS.target == 0, "setosa", "other"),
    "positions": IRIS.target,
    "numbers": np.asarray([3, 7, 11])[IRIS.target],
}


def packaged(tmp_path: Path, estimator: str, target: str) -> tuple[ModelVersion, bytes]:
    with warnings.catch_warnings():
        # skl2onnx reads SVC attributes that scikit-learn 1.9 deprecates.
        warnings.simplefilter("ignore", FutureWarning)
        model = ESTIMATORS[estimator]().fit(X, TARGETS[target])
        graph = to_onnx(model, X[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    exported = tmp_path / "model.onnx"
    exported.write_bytes(graph.SerializeToString())
    package_artifact(exported, tmp_path / "models", "m", 1, task="classification")
    folder = tmp_path / "models" / "m" / "1"
    return load_version("m", 1, folder, LoadOptions(), (0, 0.0)), exported.read_bytes()


def session_labels(data: bytes) -> NDArray[Any]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: ROWS})[0])


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_labels_are_the_graphs_own_with_their_class_positions(
    tmp_path: Path, estimator: str, target: str
) -> None:
    version, data = packaged(tmp_path, estimator, target)
    prediction = version.runtime.predict({"input": ROWS})
    label = prediction.outputs["label"]
    assert label.tolist() == session_labels(data).tolist()
    assert prediction.label_index is not None
    classes = version.signature.classes
    assert classes is not None
    assert [classes[i] for i in prediction.label_index] == label.tolist()
    # Labels keep the type the signature declares: strings as BYTES, numbers as INT64.
    assert label.dtype.kind == ("U" if isinstance(classes[0], str) else "i")


def test_a_label_that_other_nodes_read_is_left_to_the_graph(tmp_path: Path) -> None:
    """The classifier's label goes through another node before it leaves the graph: the graph
    is served as it is, and the labels are looked up."""
    version, data = packaged(tmp_path, "linear", "names")
    graph = onnx.load_from_string(data)
    label = graph.graph.output[0]
    for node in graph.graph.node:
        node.output[:] = ["raw_label" if o == label.name else o for o in node.output]
    graph.graph.node.append(helper.make_node("Identity", ["raw_label"], [label.name]))
    relayed = tmp_path / "relayed.onnx"
    relayed.write_bytes(graph.SerializeToString())
    package_artifact(relayed, tmp_path / "models", "m", 2, task="classification")
    folder = tmp_path / "models" / "m" / "2"
    served = load_version("m", 2, folder, LoadOptions(), (0, 0.0))
    prediction = served.runtime.predict({"input": ROWS})
    assert prediction.outputs["label"].tolist() == session_labels(data).tolist()
    assert prediction.label_index is not None
    assert version.runtime.predict({"input": ROWS}).outputs["label"].tolist() == (
        prediction.outputs["label"].tolist()
    )
