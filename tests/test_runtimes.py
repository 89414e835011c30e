"""Runtimes: a joblib and an ONNX version of one model expose the same tensors and answers."""

from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from service.store.packaging import package_artifact
from service.store.registry import LoadOptions, load_registry, load_version
from service.store.repository import read_verified
from service.store.runtimes import RuntimeOptions, runtime_module

WIDTH = {"iris": 4, "breast_cancer": 30, "diabetes": 10}


@pytest.mark.parametrize("name", sorted(WIDTH))
def test_joblib_and_onnx_versions_are_interchangeable(trained_repository: Path, name: str) -> None:
    registry = load_registry(trained_repository, LoadOptions())
    joblib_version, onnx_version = registry.resolve(name, "1"), registry.resolve(name, "2")
    assert (joblib_version.format, onnx_version.format) == ("sklearn", "onnx")
    assert joblib_version.signature.inputs == onnx_version.signature.inputs
    assert joblib_version.signature.outputs == onnx_version.signature.outputs
    rows = np.random.default_rng(0).normal(size=(64, WIDTH[name])).astype(np.float32)
    a = joblib_version.runtime.predict({"input": rows}).outputs
    b = onnx_version.runtime.predict({"input": rows}).outputs
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape
        if a[key].dtype.kind == "f":
            assert a[key].dtype == b[key].dtype == np.float32
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-3)
        else:
            assert a[key].tolist() == b[key].tolist()


def general_graph(path: Path) -> None:
    """A graph that is not a scikit-learn export: two named inputs, one named output."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 3])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["total"])], "add", [a, b], [total]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)


def test_general_onnx_graph_keeps_its_tensor_names(tmp_path: Path) -> None:
    folder = tmp_path / "adder" / "1"
    folder.mkdir(parents=True)
    general_graph(folder / "model.onnx")
    artifact = read_verified(folder, allow_unverified_pickle=False)
    runtime = runtime_module(artifact.path).load(artifact.data, None, RuntimeOptions())
    assert [s.name for s in runtime.signature.inputs] == ["a", "b"]
    assert [s.name for s in runtime.signature.outputs] == ["total"]
    ones = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        runtime.predict({"a": ones, "b": ones}).outputs["total"], ones * 2
    )


@pytest.mark.parametrize("classes", [2, 3])
def test_labels_where_probabilities_tie_are_the_ones_predict_gives(
    tmp_path: Path, classes: int
) -> None:
    """Scores 1e-300 apart: predict_proba rounds the classes to equal probabilities, whose first
    the argmax would take, while predict() orders them by their scores."""
    iris = load_iris()
    keep = iris.target < classes
    rows = np.asarray(iris.data[keep], dtype=np.float32)
    model = LogisticRegression().fit(rows, iris.target_names[iris.target[keep]])
    model.coef_ = np.zeros(model.coef_.shape, dtype=np.float64)
    model.coef_[-1, 0] = 1e-300
    model.intercept_ = np.zeros(model.intercept_.shape, dtype=np.float64)
    joblib.dump(model, tmp_path / "model.joblib")
    package_artifact(tmp_path / "model.joblib", tmp_path / "models", "tie", 1)
    version = load_version("tie", 1, tmp_path / "models" / "tie" / "1", LoadOptions(), (0, 0.0))
    prediction = version.runtime.predict({"input": rows})
    expected = model.predict(rows)
    assert expected[0] != model.classes_[0]  # the argmax of the tied probabilities
    assert prediction.outputs["label"].tolist() == expected.tolist()
    assert prediction.label_index is not None
    assert model.classes_[prediction.label_index].tolist() == expected.tolist()
