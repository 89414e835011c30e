"""Runtimes: a joblib and an ONNX version of one model expose the same tensors and answers."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.store.registry import LoadOptions, load_registry
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
