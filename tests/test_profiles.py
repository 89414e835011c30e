"""Reference profiles: bins of known distributions, the iris examples' profiles, integrity."""

import hashlib
import math
import shutil
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

from service.cli import main
from service.store.metadata import ArtifactMetadata
from service.store.profiles import PROFILE_FILE, Profile, bin_values, psi
from service.store.registry import LoadOptions, load_version

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_training_rows() -> np.ndarray:
    """The rows the iris example was trained on (the same split as training/examples.py)."""
    data = load_iris()
    X = np.asarray(data.data, dtype=np.float32)
    train, _, _, _ = train_test_split(X, data.target, test_size=0.25, random_state=0)
    return np.asarray(train)


def test_a_uniform_feature_gets_ten_bins_of_a_tenth() -> None:
    binned = bin_values(np.arange(1000, dtype=np.float64))
    assert len(binned.edges) == 9
    assert binned.edges == [100.0 * i for i in range(1, 10)]
    assert binned.shares == pytest.approx([0.1] * 10)
    assert (binned.min, binned.max, binned.missing_share) == (0.0, 999.0, 0.0)


def test_tied_values_merge_edges_and_missing_values_are_a_share_of_their_own() -> None:
    values = np.array([1.0] * 6 + [2.0] * 2 + [3.0] + [np.nan])
    binned = bin_values(values)
    # The deciles of the nine present values are 1, 2 and 3; an edge at the minimum goes.
    assert binned.edges == [2.0, 3.0]
    assert binned.shares == pytest.approx([6 / 9, 2 / 9, 1 / 9])
    assert binned.missing_share == pytest.approx(0.1)


def test_psi_by_hand() -> None:
    reference = np.array([0.5, 0.5])
    live = np.array([0.9, 0.1])
    by_hand = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(reference, live) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(0.8789, abs=1e-4)
    assert psi(reference, reference) == 0.0


@pytest.mark.parametrize("version", ["1", "2"])
def test_training_profiles_the_iris_examples_on_their_training_rows(
    iris_repository: Path, version: str
) -> None:
    folder = iris_repository / "iris" / version
    profile = Profile.read(folder / PROFILE_FILE)
    rows = iris_training_rows()
    assert profile.rows == len(rows) == 112
    assert [f.name for f in profile.features] == IRIS_FEATURES
    for i, feature in enumerate(profile.features):
        column = rows[:, i].astype(np.float64)
        assert (feature.min, feature.max) == (column.min(), column.max())
        assert len(feature.shares) == len(feature.edges) + 1 <= 10
        assert sum(feature.shares) == pytest.approx(1.0)
        counts = np.bincount(np.searchsorted(feature.edges, column, side="right"))
        assert feature.shares == pytest.approx((counts / len(column)).tolist())
    prediction = profile.prediction
    assert prediction is not None
    assert prediction.classes == ["setosa", "versicolor", "virginica"]
    # The model is accurate, so its class shares are close to the training labels' shares.
    labels = load_iris().target
    _, _, y_train, _ = train_test_split(labels, labels, test_size=0.25, random_state=0)
    truth = np.bincount(y_train) / len(y_train)
    assert prediction.shares == pytest.approx(truth.tolist(), abs=0.03)
    metadata = ArtifactMetadata.read(folder / "metadata.json")
    assert metadata.profile is not None
    assert (
        metadata.profile.sha256 == hashlib.sha256((folder / PROFILE_FILE).read_bytes()).hexdigest()
    )


def test_a_changed_profile_is_refused_at_load_and_by_validate(
    iris_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(iris_repository, tmp_path / "models")
    folder = tmp_path / "models" / "iris" / "1"
    loaded = load_version("iris", 1, folder, LoadOptions(), (0, 0.0))
    assert loaded.profile is not None
    text = (folder / PROFILE_FILE).read_text()
    (folder / PROFILE_FILE).write_text(text.replace('"rows": 112', '"rows": 113'))
    tampered = load_version("iris", 1, folder, LoadOptions(), (0, 0.0))
    assert tampered.profile is None
    assert any(
        "profile.json: sha256" in w and "changed or corrupted" in w for w in tampered.warnings
    )
    assert main(["validate", "--model-repository", str(tmp_path / "models")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  iris:1 profile:" in out
    assert "profile.json: sha256" in out


def test_the_profile_command_writes_a_profile_for_an_existing_version(
    iris_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(iris_repository, tmp_path / "models")
    folder = tmp_path / "models" / "iris" / "2"
    shifted = iris_training_rows().copy()
    shifted[:, 2] += 3.0
    data = tmp_path / "rows.csv"
    header = ",".join(["id", *IRIS_FEATURES])
    lines = [f"{i}," + ",".join(str(v) for v in row) for i, row in enumerate(shifted.tolist())]
    data.write_text("\n".join([header, *lines]) + "\n")
    code = main(
        ["profile", "iris:2", "--data", str(data), "--model-repository", str(tmp_path / "models")]
    )
    assert code == 0, capsys.readouterr().err
    assert "profiled iris:2 on 112 rows" in capsys.readouterr().out
    profile = Profile.read(folder / PROFILE_FILE)
    assert profile.features[2].min == pytest.approx(float(shifted[:, 2].min()))
    assert load_version("iris", 2, folder, LoadOptions(), (0, 0.0)).profile == profile


def test_the_profile_command_names_a_missing_feature_column(
    iris_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("sepal_length,sepal_width,petal_length\n1,2,3\n")
    code = main(
        ["profile", "iris:1", "--data", str(data), "--model-repository", str(iris_repository)]
    )
    assert code == 1
    assert "lacks the feature column 'petal_width'" in capsys.readouterr().err


def test_package_with_data_profiles_a_regressor_on_its_predictions(tmp_path: Path) -> None:
    rows = np.random.default_rng(0).normal(size=(400, 3))
    artifact = tmp_path / "reg.joblib"
    model = Ridge().fit(rows, rows @ [1.0, 2.0, 3.0])
    joblib.dump(model, artifact)
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"a": rows[:, 0], "b": rows[:, 1], "c": rows[:, 2]}), data)
    repository = tmp_path / "models"
    args = ["package", str(artifact), "--name", "reg", "--features", "a,b,c"]
    assert main([*args, "--model-repository", str(repository), "--data", str(data)]) == 0
    loaded = load_version("reg", 1, repository / "reg" / "1", LoadOptions(), (0, 0.0))
    assert loaded.profile is not None
    assert loaded.profile.rows == 400
    prediction = loaded.profile.prediction
    assert prediction is not None
    assert prediction.classes is None
    predicted = model.predict(rows.astype(np.float32))
    assert len(prediction.edges) == 9
    assert prediction.shares == pytest.approx([0.1] * 10, abs=0.01)
    assert prediction.min == pytest.approx(predicted.min(), rel=1e-4)
    assert prediction.max == pytest.approx(predicted.max(), rel=1e-4)
    metadata = ArtifactMetadata.read(repository / "reg" / "1" / "metadata.json")
    assert metadata.reference_sample is not None


def test_package_with_data_that_does_not_fit_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model fitted on a bare array gets features x0, x1, ...: training rows with other column
    names are refused, and the version is not left behind for a server to pick up."""
    rows = np.random.default_rng(0).normal(size=(50, 3))
    artifact = tmp_path / "reg.joblib"
    joblib.dump(Ridge().fit(rows, rows.sum(axis=1)), artifact)
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"a": rows[:, 0], "b": rows[:, 1], "c": rows[:, 2]}), data)
    repository = tmp_path / "models"
    args = ["package", str(artifact), "--name", "reg", "--model-repository", str(repository)]
    assert main([*args, "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "lacks the feature columns 'x0'" in err, err
    assert "pass --features" in err  # the note that says why the names are x0, x1, ...
    assert not (repository / "reg").exists()
