"""Scoring tables without a server: score() in process, and on a real Dask cluster."""

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.datasets import load_diabetes, load_iris

from service.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady
from service.scoring import ModelReference, cached_model, load_model, score
from service.scoring.chunks import empty_outputs
from tests.recipes import run_recipe
from tests.reference import fitted_example

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]


def iris_frame(rows: int = 150) -> pd.DataFrame:
    """Iris rows with an id, a pass-through text column, and the features in another order."""
    data = np.resize(load_iris().data.astype(np.float32), (rows, 4))
    frame = pd.DataFrame(data, columns=FEATURES)
    frame.insert(0, "id", [f"r{i:05d}" for i in range(rows)])
    frame["note"] = ["x"] * rows
    return frame[["id", "petal_width", "note", "sepal_length", "petal_length", "sepal_width"]]


def expected(repository: Path, name: str, version: int, matrix: np.ndarray) -> dict[str, Any]:
    model = load_model(ModelReference(str(repository), name, version))
    return model.runtime.predict({"input": matrix.astype(np.float32)}).outputs


@pytest.mark.parametrize("version", [1, 2])
def test_pandas_rows_come_back_with_labels_and_probabilities(
    trained_repository: Path, version: int
) -> None:
    frame = iris_frame()
    frame.index = frame.index + 1000
    scored = score(frame, ModelReference(str(trained_repository), "iris", version))
    want = expected(trained_repository, "iris", version, frame[FEATURES].to_numpy())
    assert list(scored.columns) == [
        *frame.columns,
        "label",
        *(f"probability_{c}" for c in CLASSES),
    ]
    assert list(scored.index) == list(frame.index)
    assert list(scored["id"]) == list(frame["id"])
    assert list(scored["label"]) == [str(v) for v in want["label"]]
    probabilities = scored[[f"probability_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probabilities, want["probabilities"], rtol=1e-6)
    # The labels are right too, not only self-consistent: the training data scores well.
    truth = np.resize(np.asarray(CLASSES)[load_iris().target], len(frame))
    assert (scored["label"].to_numpy() == truth).mean() > 0.9


def test_arrow_table_of_a_regressor_gets_a_prediction_column(trained_repository: Path) -> None:
    diabetes = load_diabetes()
    names = [str(n) for n in diabetes.feature_names]
    table = pa.table({n: diabetes.data[:, i] for i, n in enumerate(names)})
    scored = score(table, ModelReference(str(trained_repository), "diabetes", 2))
    assert isinstance(scored, pa.Table)
    assert scored.column_names == [*names, "prediction"]
    want = fitted_example(trained_repository, "diabetes").predict(diabetes.data)
    np.testing.assert_allclose(scored["prediction"].to_numpy(), want, rtol=1e-5)


def test_a_bad_row_fails_naming_its_row_and_column(trained_repository: Path) -> None:
    table = pa.table({n: ["1.0", "2.0", "3.0"] for n in FEATURES}).set_column(
        2, "petal_length", pa.array(["1.0", "oops", ""])
    )
    with pytest.raises(InvalidInput, match=r"row 2, column 'petal_length': not a number"):
        score(table, ModelReference(str(trained_repository), "iris"))


def test_skipping_bad_rows_marks_them_and_scores_the_rest(trained_repository: Path) -> None:
    table = pa.table({n: [5.0, 5.0, 5.0, 5.0] for n in FEATURES}).set_column(
        0, "sepal_length", pa.array([5.1, None, float("inf"), 6.3])
    )
    scored = score(table, ModelReference(str(trained_repository), "iris"), on_error="skip")
    assert scored["error"].to_pylist() == [
        None,
        "row 2, column 'sepal_length': missing value",
        "row 3, column 'sepal_length': not a finite number for the model",
        None,
    ]
    labels = scored["label"].to_pylist()
    assert labels[1] is None
    assert labels[2] is None
    assert labels[0] in CLASSES
    assert labels[3] in CLASSES


def test_missing_feature_columns_are_named(trained_repository: Path) -> None:
    table = pa.table({"sepal_length": [1.0], "petal_width": [1.0]})
    with pytest.raises(InvalidInput, match="'sepal_width', 'petal_length'"):
        score(table, ModelReference(str(trained_repository), "iris"))


def test_versions_and_aliases_resolve_as_on_the_server(trained_repository: Path) -> None:
    root = str(trained_repository)
    assert load_model(ModelReference.parse(root, "iris")).version == 2  # model.toml default
    assert load_model(ModelReference.parse(root, "iris:stable")).version == 1
    assert load_model(ModelReference.parse(root, "iris:1")).version == 1
    with pytest.raises(ModelNotFound, match="no version '9'"):
        load_model(ModelReference.parse(root, "iris:9"))


def test_a_pinned_default_that_cannot_load_is_not_replaced(repository: Path) -> None:
    (repository / "iris" / "model.toml").write_text("default_version = 5\n")
    with pytest.raises(ModelNotReady, match=r"default version 5 .*no version folder 5"):
        load_model(ModelReference(str(repository), "iris"))
    assert load_model(ModelReference(str(repository), "iris", 2)).version == 2


def test_an_artifact_that_fails_its_hash_check_is_refused(repository: Path) -> None:
    artifact = repository / "iris" / "2" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(ModelReference(str(repository), "iris", 2))


def test_a_dask_cluster_scores_partitions_like_in_process(
    trained_repository: Path, tmp_path: Path
) -> None:
    dd = pytest.importorskip("dask.dataframe")
    distributed = pytest.importorskip("distributed")
    # The workers load the model from their own copy, as a job would from shared storage.
    root = tmp_path / "models"
    shutil.copytree(trained_repository, root)
    reference = ModelReference(str(root), "iris", 2)
    frame = iris_frame(4000)
    local = score(frame, reference)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        partitions = dd.from_pandas(frame, npartitions=8)
        remote = run_recipe("Dask", root, ddf=partitions).compute()  # the README's recipe
        loads = client.run(lambda: cached_model.cache_info()._asdict())
    # Dask may hold text in its own string dtype; the values must be the same.
    pd.testing.assert_frame_equal(remote, local, check_dtype=False)
    assert len(loads) == 2
    # Each worker process loaded the model at most once and reused it for its partitions.
    assert all(info["misses"] <= 1 for info in loads.values())
    assert sum(info["hits"] + info["misses"] for info in loads.values()) == 8


@pytest.mark.parametrize(("name", "version"), [("iris", 1), ("iris", 2), ("diabetes", 1)])
def test_a_chunk_of_bad_rows_gets_the_columns_a_good_chunk_gets(
    trained_repository: Path, name: str, version: int
) -> None:
    """Zero-row outputs come from the signature, with the types the model itself returns."""
    model = load_model(ModelReference(str(trained_repository), name, version))
    features = model.signature.features
    good = pa.table({f: [0.5, 1.5] for f in features})
    bad = pa.table({f: pa.array([None, None], pa.float64()) for f in features})
    reference = ModelReference(str(trained_repository), name, version)
    scored_good = score(good, reference, on_error="skip")
    scored_bad = score(bad, reference, on_error="skip")
    assert scored_bad.column_names == scored_good.column_names
    assert scored_bad["error"].null_count == 0
    for column in scored_good.column_names:
        if column in features or column == "error":
            continue
        assert scored_bad[column].null_count == 2, column
        # The same Arrow type, so Parquet parts of one job share one schema.
        assert scored_bad[column].type == scored_good[column].type, column
    empty = empty_outputs(model.signature)
    real = model.runtime.predict({"input": np.ones((1, len(features)), np.float32)}).outputs
    assert empty.keys() == real.keys()
    for key, array in empty.items():
        assert array.shape == (0, *real[key].shape[1:]), key
        assert array.dtype.kind == real[key].dtype.kind, key
