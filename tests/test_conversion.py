"""`modelserve convert`: scikit-learn versions to ONNX versions, accepted only with parity."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import onnx
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from numpy.typing import NDArray
from sklearn import datasets
from sklearn.linear_model import LogisticRegression

from service.store.packaging import package_artifact
from service.store.registry import LoadOptions, load_registry
from service.store.repository import sha256_file
from service.store.runtimes import RuntimeOptions
from tests.serving import run_server
from training.examples import EXAMPLES

LOADERS = {e.name: e.load for e in EXAMPLES}
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def modelserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def convert(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return modelserve("convert", *args, "--model-repository", str(root))


def dataset(name: str) -> NDArray[np.float32]:
    return np.asarray(LOADERS[name]().data, dtype=np.float32)


def write_csv(path: Path, rows: NDArray[np.float32], features: list[str]) -> Path:
    pa_csv.write_csv(pa.table({f: rows[:, i] for i, f in enumerate(features)}), path)
    return path


def features_of(root: Path, name: str) -> list[str]:
    features: list[str] = json.loads((root / name / "1" / "metadata.json").read_text())["features"]
    return features


def assert_refused(result: subprocess.CompletedProcess[str], *causes: str) -> list[str]:
    """Exit 1, one `error:` line that names the causes, then the disagreeing rows."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: the ONNX conversion of "), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    for cause in causes:
        assert cause in lines[0], lines[0]
    rows = [line.strip() for line in lines[1:] if line.strip().startswith("row ")]
    assert rows, result.stderr
    return rows


def assert_nothing_written(root: Path, name: str, versions: set[str]) -> None:
    assert {p.name for p in (root / name).iterdir() if p.is_dir()} == versions
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["iris", "breast_cancer", "diabetes"])
def test_converts_an_example_with_parity(repository: Path, name: str) -> None:
    result = convert(repository, f"{name}:1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"converted {name}:1 to {name}:3 ")
    if name == "breast_cancer":  # the README shows this conversion's output
        shown = result.stdout.replace(str(repository), "models")
        assert shown in README, shown

    source = json.loads((repository / name / "1" / "metadata.json").read_text())
    folder = repository / name / "3"
    metadata = json.loads((folder / "metadata.json").read_text())
    origin = metadata["converted_from"]
    assert (origin["version"], origin["artifact"]) == (1, "model.joblib")
    assert (
        origin["sha256"]
        == source["sha256"]
        == sha256_file(repository / name / "1" / "model.joblib")
    )
    assert origin["converter"]["skl2onnx"]
    parity = origin["parity"]
    assert parity["rows"] == source["reference_sample"]["rows"] > 100
    assert parity["tolerance"] == 1e-5
    assert metadata["sha256"] == sha256_file(folder / "model.onnx")
    assert metadata["reference_sample"]["sha256"] == sha256_file(
        folder / "reference_sample.parquet"
    )
    for key in ("task", "features", "classes", "inputs", "training"):
        assert metadata[key] == source[key], key
    # The source's drift profile holds for it (same rows, predictions at parity): it is kept.
    assert source["profile"] is not None
    assert metadata["profile"] == source["profile"]
    assert (folder / "profile.json").read_bytes() == (
        repository / name / "1" / "profile.json"
    ).read_bytes()
    assert metadata["outputs"] == source["outputs"]
    graph = onnx.load(folder / "model.onnx").graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == [o["name"] for o in source["outputs"]]

    # The new version, loaded as the server loads it, answers the whole dataset as version 1.
    entry = load_registry(repository, LoadOptions()).model(name)
    assert set(entry.versions) == {1, 2, 3}
    rows = dataset(name)
    original = entry.versions[1].runtime.predict({"input": rows}).outputs
    converted = entry.versions[3].runtime.predict({"input": rows}).outputs
    if metadata["task"] == "classification":
        assert parity["label_agreement"] == 1.0
        assert parity["max_abs_probability_difference"] < 1e-6
        np.testing.assert_array_equal(converted["label"], original["label"])
        np.testing.assert_allclose(converted["probabilities"], original["probabilities"], atol=1e-5)
    else:
        assert parity["max_relative_prediction_difference"] < 1e-6
        np.testing.assert_allclose(converted["prediction"], original["prediction"], rtol=1e-5)


def test_converted_forest_serves_the_same_answers_over_http(
    repository: Path, tmp_path: Path
) -> None:
    assert convert(repository, "breast_cancer:1", "--version", "7").returncode == 0
    rows = dataset("breast_cancer")
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }
    with run_server(repository, tmp_path) as server, httpx.Client(base_url=server.url) as client:
        answers: dict[str, dict[str, Any]] = {}
        for version in ("1", "7"):
            response = client.post(f"/v2/models/breast_cancer/versions/{version}/infer", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == version
            answers[version] = {o["name"]: o for o in response.json()["outputs"]}
        metadata = client.get("/v2/models/breast_cancer/versions/7").json()
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert answers["7"]["label"]["data"] == answers["1"]["label"]["data"]
    np.testing.assert_allclose(
        answers["7"]["probabilities"]["data"], answers["1"]["probabilities"]["data"], atol=1e-5
    )


def forest_ties(rows: NDArray[np.float32], forest: Any, wanted: int) -> NDArray[np.float32]:
    """Rows (each feature taken from a random row of the data) on which the forest's trees
    split exactly evenly between the two classes."""
    rng = np.random.default_rng(0)
    found: list[NDArray[np.float32]] = []
    while sum(len(f) for f in found) < wanted:
        picks = rng.integers(len(rows), size=(20_000, rows.shape[1]))
        mixed = rows[picks, np.arange(rows.shape[1])]
        found.append(mixed[forest.predict_proba(mixed)[:, 0] == 0.5])
    return np.concatenate(found)[:wanted]


def test_forest_ties_keep_their_labels(repository: Path, tmp_path: Path) -> None:
    forest = joblib.load(repository / "breast_cancer" / "1" / "model.joblib")
    ties = forest_ties(dataset("breast_cancer"), forest, wanted=300)
    # Two intra-op threads sum the trees in two parts, in a different order than scikit-learn.
    threaded = LoadOptions(runtime=RuntimeOptions(onnx_intra_op_threads=2))
    registry = load_registry(repository, threaded)
    joblib_version, plain_export = (registry.resolve("breast_cancer", v) for v in ("1", "2"))
    original = joblib_version.runtime.predict({"input": ties}).outputs["label"]
    # A plain skl2onnx export (version 2) sums in float32 and flips tied labels: the sample is
    # a real test of the conversion's double-precision sums.
    exported = plain_export.runtime.predict({"input": ties}).outputs["label"]
    assert (exported != original).sum() > 10

    sample = write_csv(tmp_path / "ties.csv", ties, features_of(repository, "breast_cancer"))
    result = convert(repository, "breast_cancer:1", "--sample", str(sample))
    assert result.returncode == 0, result.stderr
    parity = json.loads((repository / "breast_cancer" / "3" / "metadata.json").read_text())[
        "converted_from"
    ]["parity"]
    assert (parity["rows"], parity["label_agreement"]) == (300, 1.0)
    assert parity["sample"] == str(sample)
    converted = load_registry(repository, threaded).resolve("breast_cancer", "3")
    np.testing.assert_array_equal(
        converted.runtime.predict({"input": ties}).outputs["label"], original
    )


def test_refuses_labels_that_flip_on_the_decision_boundary(
    repository: Path, tmp_path: Path
) -> None:
    """A logistic regression computed in float32 by ONNX but in float64 by scikit-learn: rows
    on its decision boundary land on either side."""
    bunch = datasets.load_breast_cancer()
    rows = np.asarray(bunch.data, dtype=np.float32)
    model = LogisticRegression(max_iter=5000).fit(
        rows, np.asarray(bunch.target_names)[bunch.target]
    )
    artifact = tmp_path / "linear.joblib"
    joblib.dump(model, artifact)
    features = [f"f{i}" for i in range(rows.shape[1])]
    package_artifact(artifact, repository, "linear", 1, features=features)
    normal, offset = model.coef_[0], model.intercept_[0]
    boundary = rows - ((rows @ normal + offset) / (normal @ normal))[:, None] * normal
    sample = write_csv(tmp_path / "boundary.csv", boundary.astype(np.float32), features)

    rows_shown = assert_refused(
        convert(repository, "linear:1", "--sample", str(sample)),
        "the ONNX conversion of linear:1 disagrees with it on",
        "labels differ on",
        "linear:2 was not written",
    )
    assert "'benign'" in rows_shown[0]
    assert "'malignant'" in rows_shown[0]
    assert_nothing_written(repository, "linear", {"1"})


def test_refuses_probabilities_beyond_the_tolerance(repository: Path) -> None:
    result = convert(repository, "iris:1", "--tolerance", "0")
    assert result.stderr.splitlines()[0] in README  # the README shows this refusal
    rows_shown = assert_refused(
        result,
        "rows of the reference sample of iris:1",
        "probabilities differ by up to",
        "above the tolerance of 0",
        "raise --tolerance",
    )
    assert len(rows_shown) == 5
    assert_nothing_written(repository, "iris", {"1", "2"})


def test_refuses_a_tampered_reference_sample(repository: Path, tmp_path: Path) -> None:
    sample = repository / "diabetes" / "1" / "reference_sample.parquet"
    pq.write_table(pq.read_table(sample).slice(1), sample)
    result = convert(repository, "diabetes:1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "reference_sample.parquet: sha256" in result.stderr
    assert "does not match metadata.json" in result.stderr
    assert_nothing_written(repository, "diabetes", {"1", "2"})
    validated = modelserve("validate", "--model-repository", str(repository))
    assert validated.returncode == 1
    assert "FAIL  diabetes:1 reference sample:" in validated.stdout

    # A sample file given instead is used.
    given = write_csv(
        tmp_path / "rows.csv", dataset("diabetes"), features_of(repository, "diabetes")
    )
    assert convert(repository, "diabetes:1", "--sample", str(given)).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("iris:2",), "iris:2 is already model.onnx; nothing to convert"),
        (("iris:stable", "--version", "2"), "iris/2 exists; choose another --version"),
        (("iris:9",), "model 'iris' has no version '9'"),
        (("iris",), "name the version to convert: MODEL:VERSION"),
    ],
)
def test_refuses_what_cannot_be_converted(
    repository: Path, args: tuple[str, ...], message: str
) -> None:
    result = convert(repository, *args)
    assert result.returncode in (1, 2)
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert_nothing_written(repository, "iris", {"1", "2"})


def test_a_sample_file_must_hold_the_features(repository: Path, tmp_path: Path) -> None:
    features = features_of(repository, "iris")
    sample = write_csv(tmp_path / "short.csv", dataset("iris")[:, :3], features[:3])
    result = convert(repository, "iris:1", "--sample", str(sample))
    assert result.returncode == 1
    assert f"lacks the feature column {features[3]!r}" in result.stderr


def test_converts_a_linear_classifier_with_integer_classes(
    repository: Path, tmp_path: Path
) -> None:
    """skl2onnx's LinearClassifier (and SVMClassifier) name integer classes `classlabels_ints`,
    not `classlabels_int64s` as tree ensembles do: such a conversion was refused, its classes
    read as None."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    wine = datasets.load_wine()
    rows = np.asarray(wine.data, dtype=np.float32)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
        rows, wine.target
    )
    artifact = tmp_path / "wine.joblib"
    joblib.dump(model, artifact)
    features = [f"f{i}" for i in range(rows.shape[1])]
    package_artifact(artifact, repository, "wine", 1, features=features)
    sample = write_csv(tmp_path / "wine.csv", rows, features)
    result = convert(repository, "wine:1", "--sample", str(sample))
    assert result.returncode == 0, result.stderr
    entry = load_registry(repository, LoadOptions()).model("wine")
    assert entry.versions[2].signature.classes == [0, 1, 2]
    converted = entry.versions[2].runtime.predict({"input": rows}).outputs
    np.testing.assert_array_equal(converted["label"], model.predict(rows))


def test_an_estimator_skl2onnx_cannot_convert_is_named_in_one_line(
    repository: Path, tmp_path: Path
) -> None:
    """Any step of a Pipeline may be the one skl2onnx cannot convert: all of them are named."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    iris = datasets.load_iris()
    rows = np.asarray(iris.data, dtype=np.float32)
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=500))
    artifact = tmp_path / "logs.joblib"
    joblib.dump(model.fit(rows, iris.target), artifact)
    features = [f"f{i}" for i in range(rows.shape[1])]
    package_artifact(artifact, repository, "logs", 1, features=features)
    sample = write_csv(tmp_path / "rows.csv", rows, features)
    result = convert(repository, "logs:1", "--sample", str(sample))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "error: skl2onnx cannot convert Pipeline(FunctionTransformer, LogisticRegression) ("
    ), lines[0]
    assert_nothing_written(repository, "logs", {"1"})
