"""Labels encoded and counted by class position match the string-by-string path exactly."""

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from service.protocols import v1, v2
from service.store.labels import ClassLabels
from service.store.registry import LoadOptions, ModelVersion, load_registry
from service.store.repository import read_verified
from service.store.runtimes import Prediction, RuntimeOptions
from service.store.runtimes import onnx as onnx_runtime
from service.store.runtimes.sklearn import SklearnRuntime, describe_estimator


def _version(classes: list[Any]) -> ModelVersion:
    data = load_iris()
    estimator = LogisticRegression(max_iter=500).fit(data.data, np.array(classes)[data.target])
    runtime = SklearnRuntime(estimator, describe_estimator(estimator))
    return ModelVersion("custom", 1, runtime, Path("custom.joblib"), None, "", 0.0, 256, 0.0)


@pytest.fixture(scope="module")
def versions(iris_repository: Path) -> dict[str, ModelVersion]:
    registry = load_registry(iris_repository, LoadOptions())
    return {
        "iris-joblib": registry.resolve("iris", "1"),
        "iris-onnx": registry.resolve("iris", "2"),
        "non-ascii": _version(["sétosa", "versicolor", "virgínica ✓"]),
        "integers": _version([10, 20, 30]),
    }


@pytest.mark.parametrize("key", ["iris-joblib", "iris-onnx", "non-ascii", "integers"])
def test_by_class_and_by_string_answers_are_identical(
    versions: dict[str, ModelVersion], key: str
) -> None:
    model = versions[key]
    rows = np.random.default_rng(0).normal(loc=4, scale=2, size=(500, 4)).astype(np.float32)
    prediction = model.runtime.predict({"input": rows})
    outputs, index = prediction.outputs, prediction.label_index
    assert model.labels is not None
    assert index is not None
    assert len(set(index.tolist())) > 1  # the rows reach more than one class
    assert np.asarray(model.signature.classes)[index].tolist() == outputs["label"].tolist()

    call = v2.InferCall({"input": rows}, id="r")
    for binary in (True, False):
        wanted = [("label", binary), ("probabilities", binary)]
        by_string = v2.encode_infer_response(model, call, Prediction(outputs), wanted)
        assert v2.encode_infer_response(model, call, prediction, wanted) == by_string
    assert v1.encode_predict_response(model, prediction) == v1.encode_predict_response(
        model, Prediction(outputs)
    )
    if key == "integers":  # integer labels stay an INT64 tensor, encoded as numbers
        header = orjson.loads(v2.encode_infer_response(model, call, prediction, wanted)[0])
        assert header["outputs"][0]["datatype"] == "INT64"
        assert set(header["outputs"][0]["data"]) <= {10, 20, 30}
    values, counts = np.unique(outputs["label"], return_counts=True)
    expected = [(str(v), c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)]
    per_class = prediction.class_counts(len(model.labels.names))
    assert sorted(model.labels.counts(per_class)) == sorted(expected)


def test_non_ascii_labels_are_utf8_in_binary(versions: dict[str, ModelVersion]) -> None:
    model = versions["non-ascii"]
    assert model.labels is not None
    raw = model.labels.bytes_elements(np.array([2, 0]))
    encoded = "virgínica ✓".encode()
    assert raw[:4] == len(encoded).to_bytes(4, "little")
    assert raw[4 : 4 + len(encoded)] == encoded
    assert raw[4 + len(encoded) :] == b"\x07\x00\x00\x00" + "sétosa".encode()


def test_json_labels_keep_their_type(versions: dict[str, ModelVersion]) -> None:
    model = versions["integers"]
    assert model.labels is not None
    assert orjson.dumps(model.labels.values(np.array([0, 2]))) == b"[10,30]"


@pytest.mark.parametrize("n_classes", [1, 2, 3, 40])
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 1000])
def test_binary_labels_in_runs_match_label_by_label(n_classes: int, rows: int) -> None:
    classes = [f"class-{i}" * (1 + i % 3) for i in range(n_classes)]
    labels = ClassLabels(classes)
    index = np.random.default_rng(rows).integers(0, n_classes, rows)
    one_by_one = b"".join(
        len(classes[i]).to_bytes(4, "little") + classes[i].encode() for i in index.tolist()
    )
    assert labels.bytes_elements(index) == one_by_one


def test_onnx_labels_outside_the_listed_classes_keep_their_values(iris_repository: Path) -> None:
    """Metadata that lists other classes than the graph gives: no positions, labels as given."""
    verified = read_verified(iris_repository / "iris" / "2", False)
    assert verified.metadata is not None
    other = verified.metadata.model_copy(update={"classes": ["a", "b", "c"]})
    runtime = onnx_runtime.load(verified.data, other, RuntimeOptions())
    rows = np.random.default_rng(0).normal(loc=4, scale=2, size=(50, 4)).astype(np.float32)
    prediction = runtime.predict({"input": rows})
    assert prediction.label_index is None
    assert set(prediction.outputs["label"].tolist()) <= {"setosa", "versicolor", "virginica"}
