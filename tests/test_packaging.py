"""`modelserve package`: recognised ONNX exports, feature names, signature agreement, flags."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_iris, load_wine
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier

from service.cli import main
from service.store.registry import LoadOptions, load_registry
from tests.serving import run_server

IRIS = load_iris(as_frame=True)
COLUMNS = [str(c) for c in IRIS.data.columns]
ROWS = IRIS.data.to_numpy(dtype=np.float32)


@dataclass(frozen=True)
class Artifacts:
    folder: Path

    def __getitem__(self, name: str) -> Path:
        return self.folder / name


def export(model: Any, rows: NDArray[np.float32], **options: Any) -> bytes:
    """skl2onnx with its default names and options, as a user calls it."""
    graph = to_onnx(model, rows[:1], options=options or None)
    data: bytes = graph.SerializeToString()
    return data


def handmade_graph(width: int) -> bytes:
    """A linear model written by hand: not a skl2onnx export, with its own tensor names."""
    weights = numpy_helper.from_array(np.ones((width, 1), dtype=np.float32), "weights")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "weights"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [weights],
    )
    model = helper.make_model(
        graph, producer_name="handmade", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    folder = tmp_path_factory.mktemp("artifacts")
    # Fitted on a DataFrame, as most users do: the joblib version knows the column names.
    framed = LogisticRegression(max_iter=1000).fit(IRIS.data, IRIS.target)
    joblib.dump(framed, folder / "iris_frame.joblib")
    (folder / "iris.onnx").write_bytes(export(framed, ROWS, zipmap=False))
    joblib.dump(LogisticRegression(max_iter=1000).fit(ROWS, IRIS.target), folder / "iris.joblib")
    (folder / "iris_zipmap.onnx").write_bytes(export(framed, ROWS))
    diabetes = load_diabetes()
    ridge = Ridge().fit(diabetes.data, diabetes.target)
    joblib.dump(ridge, folder / "diabetes.joblib")
    (folder / "diabetes.onnx").write_bytes(export(ridge, diabetes.data.astype(np.float32)))
    wine = load_wine()
    joblib.dump(
        LogisticRegression(max_iter=5000).fit(wine.data, wine.target), folder / "wine.joblib"
    )
    (folder / "handmade.onnx").write_bytes(handmade_graph(4))
    return Artifacts(folder)


def package(root: Path, artifact: Path, *args: str) -> int:
    return main(["package", str(artifact), "--model-repository", str(root), *args])


def metadata(root: Path, name: str, version: int) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((root / name / str(version) / "metadata.json").read_text())
    return loaded


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("estimator", "labels"),
    [
        (LogisticRegression(max_iter=1000), [0, 1, 2]),  # classes in a node attribute (ints)
        (RandomForestClassifier(n_estimators=5, random_state=0), ["a", "b", "c"]),
        (GaussianNB(), [3, 7, 9]),  # classes in a constant the label is looked up in
        (KNeighborsClassifier(), ["setosa", "versicolor", "virginica"]),
    ],
    ids=["logistic", "forest", "naive-bayes", "k-nn"],
)
def test_skl2onnx_classifiers_get_the_tensors_of_their_joblib_version(
    tmp_path: Path, estimator: Any, labels: list[Any]
) -> None:
    target = np.asarray(labels)[IRIS.target.to_numpy()]
    model = estimator.fit(ROWS, target)
    joblib.dump(model, tmp_path / "model.joblib")
    (tmp_path / "model.onnx").write_bytes(export(model, ROWS, zipmap=False))
    root = tmp_path / "models"
    assert package(root, tmp_path / "model.joblib", "--name", "m") == 0
    assert package(root, tmp_path / "model.onnx", "--name", "m") == 0
    pickled, exported = metadata(root, "m", 1), metadata(root, "m", 2)
    for key in ("task", "inputs", "outputs", "classes", "features"):
        assert exported[key] == pickled[key], key
    assert exported["classes"] == labels
    assert exported["outputs"][0]["name"] == "label"
    served = load_registry(root, LoadOptions()).resolve("m", "2")
    answer = served.runtime.predict({"input": ROWS}).outputs
    np.testing.assert_array_equal(answer["label"], model.predict(ROWS))
    np.testing.assert_allclose(answer["probabilities"], model.predict_proba(ROWS), atol=1e-5)


@pytest.mark.e2e
def test_skl2onnx_regressor_serves_prediction_like_its_joblib_version(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["diabetes.joblib"], "--name", "diabetes") == 0
    assert package(root, artifacts["diabetes.onnx"], "--name", "diabetes") == 0  # no --task
    exported = metadata(root, "diabetes", 2)
    assert exported["task"] == "regression"
    assert exported["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    assert exported["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1]}]
    rows = load_diabetes().data[:8].astype(np.float32)
    expected = joblib.load(artifacts["diabetes.joblib"]).predict(rows)
    body = {
        "inputs": [{"name": "input", "shape": [8, 10], "datatype": "FP32", "data": rows.tolist()}]
    }
    with run_server(root, tmp_path) as server:
        for version in (1, 2):
            url = f"{server.url}/v2/models/diabetes/versions/{version}"
            described = httpx.get(url).json()
            assert [o["name"] for o in described["outputs"]] == ["prediction"]
            answer = httpx.post(f"{url}/infer", json=body)
            assert answer.status_code == 200, answer.text
            (output,) = answer.json()["outputs"]
            assert output["name"] == "prediction"
            np.testing.assert_allclose(output["data"], expected, rtol=1e-5)


def test_task_names_the_output_of_a_graph_that_is_not_recognised(
    tmp_path: Path, artifacts: Artifacts, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["handmade.onnx"], "--name", "own") == 0
    assert package(root, artifacts["handmade.onnx"], "--name", "reg", "--task", "regression") == 0
    own, regression = metadata(root, "own", 1), metadata(root, "reg", 1)
    assert (own["task"], [o["name"] for o in own["outputs"]]) == ("other", ["y"])
    assert own["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert regression["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1]}]
    capsys.readouterr()
    source = artifacts["iris.onnx"]
    assert package(root, source, "--name", "iris", "--task", "regression") == 1
    assert error_lines(capsys) == [
        f"error: {source} is a classification model; drop --task regression "
        "(it is for ONNX graphs whose task cannot be recognised)"
    ]


@pytest.mark.parametrize("nameless", ["iris.onnx", "iris.joblib"], ids=["onnx", "array-fitted"])
def test_a_version_without_names_takes_those_of_the_other_versions(
    tmp_path: Path, artifacts: Artifacts, capsys: pytest.CaptureFixture[str], nameless: str
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["iris_frame.joblib"], "--name", "iris") == 0
    assert metadata(root, "iris", 1)["features"] == COLUMNS
    capsys.readouterr()
    assert package(root, artifacts[nameless], "--name", "iris") == 0
    assert metadata(root, "iris", 2)["features"] == COLUMNS
    assert error_lines(capsys) == [
        f"note: {nameless} carries no feature names; using those of version 1"
    ]


def test_an_onnx_model_alone_gets_generated_feature_names_and_says_so(
    tmp_path: Path, artifacts: Artifacts, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["iris.onnx"], "--name", "iris") == 0
    assert metadata(root, "iris", 1)["features"] == ["x0", "x1", "x2", "x3"]
    assert error_lines(capsys) == [
        "note: iris.onnx carries no feature names; named them x0…x3 (pass --features to name them)"
    ]
    assert package(root, artifacts["iris.onnx"], "--name", "named", "--features", "a,b,c,d") == 0
    assert metadata(root, "named", 1)["features"] == ["a", "b", "c", "d"]
    assert error_lines(capsys) == []


def test_a_version_of_another_width_is_refused_unless_allowed(
    tmp_path: Path, artifacts: Artifacts, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["iris_frame.joblib"], "--name", "m") == 0
    capsys.readouterr()
    source = artifacts["wine.joblib"]
    assert package(root, source, "--name", "m") == 1
    assert error_lines(capsys) == [
        f"error: {source} takes input 'input' of 13 features, but version 1 takes input 'input' "
        "of 4 features; clients of the default version or an alias would break. Make them agree "
        "(train it on the same 4 features as version 1), package it under another --name, or pass "
        "--allow-signature-change"
    ]
    assert not (root / "m" / "2").exists()
    assert package(root, source, "--name", "m", "--allow-signature-change") == 0
    # The other version's names do not fit 13 features: generated ones, said so.
    assert metadata(root, "m", 2)["features"] == [f"x{i}" for i in range(13)]
    assert error_lines(capsys) == [
        "note: wine.joblib carries no feature names; named them x0…x12 "
        "(pass --features to name them)"
    ]


def test_a_version_with_another_input_name_is_refused_unless_allowed(
    tmp_path: Path, artifacts: Artifacts, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["iris_frame.joblib"], "--name", "m") == 0
    capsys.readouterr()
    source = artifacts["handmade.onnx"]
    assert package(root, source, "--name", "m") == 1
    assert error_lines(capsys) == [
        f"error: {source} takes input 'X' of 4 features, but version 1 takes input 'input' of 4 "
        "features; clients of the default version or an alias would break. Make them agree "
        "(export it with its input named 'input'), package it under another --name, or pass "
        "--allow-signature-change"
    ]
    assert package(root, source, "--name", "m", "--allow-signature-change") == 0
    assert metadata(root, "m", 2)["inputs"][0]["name"] == "X"


def test_a_zipmap_output_is_refused_with_the_export_option_that_fixes_it(
    tmp_path: Path, artifacts: Artifacts, capsys: pytest.CaptureFixture[str]
) -> None:
    assert package(tmp_path / "models", artifacts["iris_zipmap.onnx"], "--name", "iris") == 1
    assert error_lines(capsys) == [
        "error: output 'output_probability' is a ZipMap (a sequence of maps, one per row), which "
        "cannot be served as a tensor; export with zipmap disabled: "
        'to_onnx(model, X, options={id(model): {"zipmap": False}}), '
        'or options={"zipmap": False} when the model is the classifier itself'
    ]
    assert not (tmp_path / "models" / "iris").exists()


@pytest.mark.parametrize(("flag", "expected"), [((), False), (("--allow-nan",), True)])
def test_allow_nan_is_written_to_the_metadata(
    tmp_path: Path, artifacts: Artifacts, flag: tuple[str, ...], expected: bool
) -> None:
    root = tmp_path / "models"
    assert package(root, artifacts["iris_frame.joblib"], "--name", "m", *flag) == 0
    assert metadata(root, "m", 1)["allow_nan"] is expected


def test_package_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(["package", "--help"])
    assert exit_status.value.code == 0
    shown = capsys.readouterr().out
    usage = shown.split("\n\n")[0]
    options = [*re.findall(r"--[a-z-]+", usage), "ARTIFACT"]
    assert {"--allow-nan", "--allow-signature-change", "--features", "--task"} <= set(options)
    for option in options:
        # argparse puts the description after the option (and its metavar), or on the next line.
        described = rf"^  {re.escape(option)}(?: \S+)?(?:  +\S| *\n {{20,}}\S)"
        assert re.search(described, shown, re.MULTILINE), f"{option} has no description"
