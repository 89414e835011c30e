"""Logistic regressions computed as plain array operations give the estimator's own answers."""

from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_linnerud, load_wine
from sklearn.linear_model import Lasso, LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from service.store.runtimes.feature_names import array_ready
from service.store.runtimes.linear import linear_call
from service.store.runtimes.sklearn import SklearnRuntime, describe_estimator


def _data(name: str) -> tuple[NDArray[np.float32], NDArray[Any]]:
    data = {"iris": load_iris, "wine": load_wine, "cancer": load_breast_cancer}[name]()
    return data.data.astype(np.float32), np.asarray(data.target_names)[data.target]


def _rows(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Rows the model has not seen, some far outside the training range."""
    rng = np.random.default_rng(1)
    noisy = x * (1 + rng.normal(scale=0.2, size=x.shape).astype(np.float32))
    return np.concatenate([noisy, noisy[:20] * 50, -noisy[:20]]).astype(np.float32)


@pytest.mark.parametrize(
    ("data", "estimator"),
    [
        ("iris", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))),
        ("wine", make_pipeline(StandardScaler(), LogisticRegression(C=100, max_iter=5000))),
        ("cancer", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))),
        ("iris", LogisticRegression(max_iter=1000)),
        (
            "iris",
            make_pipeline(
                StandardScaler(with_mean=False), StandardScaler(), LogisticRegression(max_iter=1000)
            ),
        ),
    ],
    ids=["iris", "wine", "binary", "no-scaler", "two-scalers"],
)
def test_the_runtime_gives_the_estimators_own_answers(data: str, estimator: Any) -> None:
    x, y = _data(data)
    estimator.fit(x, y)
    call = linear_call(estimator, "predict_proba")
    assert call is not None
    rows = _rows(x)
    for batch in (rows, rows.astype(np.float64), rows[:1]):
        assert np.array_equal(call(batch), estimator.predict_proba(batch))
    runtime = SklearnRuntime(estimator, describe_estimator(estimator))
    prediction = runtime.predict({"input": rows})
    probabilities = prediction.outputs["probabilities"]
    assert probabilities.flags.c_contiguous
    assert np.array_equal(probabilities, estimator.predict_proba(rows).astype(np.float32))
    assert prediction.outputs["label"].tolist() == estimator.predict(rows).tolist()


def test_a_model_fitted_on_a_dataframe_gives_its_own_answers() -> None:
    x, y = _data("iris")
    frame = pd.DataFrame(x, columns=["sepal length", "sepal width", "petal length", "petal width"])
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(frame, y)
    rows = _rows(x)
    expected = pipeline.predict_proba(pd.DataFrame(rows, columns=frame.columns))
    # As the runtime calls it: on arrays.
    call = linear_call(array_ready(pipeline), "predict_proba")
    assert call is not None
    assert np.array_equal(call(rows), expected)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_values_the_estimator_refuses_are_refused(value: float) -> None:
    x, y = _data("iris")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    call = linear_call(pipeline, "predict_proba")
    assert call is not None
    rows = _rows(x[:3])
    rows[1, 2] = value
    with pytest.raises(ValueError, match="Input X contains"):
        pipeline.predict_proba(rows)
    with pytest.raises(ValueError, match="NaN, infinity"):
        call(rows)


@pytest.mark.parametrize("width", [3, 5])
def test_rows_of_another_width_are_refused_as_the_estimator_refuses_them(width: int) -> None:
    x, y = _data("iris")
    model = LogisticRegression(max_iter=1000).fit(x, y)
    call = linear_call(model, "predict_proba")
    assert call is not None
    rows = np.resize(_rows(x[:3]), (3, width))
    with pytest.raises(ValueError, match=f"X has {width} features"):
        model.predict_proba(rows)
    with pytest.raises(ValueError, match=f"X has {width} features, but LogisticRegression"):
        call(rows)


class _Tempered(LogisticRegression):  # type: ignore[misc]  # untyped base
    """A subclass may change what predict_proba means; plain arithmetic must not stand in."""

    def predict_proba(self, X: Any) -> Any:
        return np.sqrt(super().predict_proba(X))


def test_other_models_and_steps_keep_their_own_method() -> None:
    x, y = _data("iris")
    assert linear_call(_Tempered(max_iter=1000).fit(x, y), "predict_proba") is None
    assert linear_call(LogisticRegression(max_iter=1000).fit(x, y), "predict") is None
    other_scaler = make_pipeline(MinMaxScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    assert linear_call(other_scaler, "predict_proba") is None
    tempered = make_pipeline(StandardScaler(), _Tempered(max_iter=1000)).fit(x, y)
    runtime = SklearnRuntime(tempered, describe_estimator(tempered))
    rows = _rows(x)
    assert np.array_equal(
        runtime.predict({"input": rows}).outputs["probabilities"],
        tempered.predict_proba(rows).astype(np.float32),
    )


def test_integer_rows_are_converted_as_the_estimator_converts_them() -> None:
    x, y = _data("iris")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    call = linear_call(pipeline, "predict_proba")
    assert call is not None
    rows = np.rint(_rows(x)).astype(np.int64)
    assert np.array_equal(call(rows), pipeline.predict_proba(rows))


@pytest.mark.parametrize(
    ("estimator", "targets"),
    [
        (make_pipeline(StandardScaler(), Ridge(alpha=1.0)), 1),
        (Ridge(alpha=0.1), 1),
        (LinearRegression(), 1),
        (make_pipeline(StandardScaler(), LinearRegression()), 3),
    ],
    ids=["scaled-ridge", "ridge", "linear", "three-targets"],
)
def test_regressors_give_their_own_values(estimator: Any, targets: int) -> None:
    data = load_diabetes() if targets == 1 else load_linnerud()
    x = data.data.astype(np.float32)
    estimator.fit(x, data.target)
    call = linear_call(estimator, "predict")
    assert call is not None
    rows = _rows(x)
    for batch in (rows, rows.astype(np.float64), rows[:1]):
        assert np.array_equal(call(batch), estimator.predict(batch))
    if targets == 1:
        runtime = SklearnRuntime(estimator, describe_estimator(estimator))
        values = runtime.predict({"input": rows}).outputs["prediction"]
        assert np.array_equal(values, estimator.predict(rows).astype(np.float32))


def test_other_regressors_keep_their_own_method() -> None:
    data = load_diabetes()
    x = data.data.astype(np.float32)
    assert linear_call(Lasso().fit(x, data.target), "predict") is None
    assert linear_call(Ridge().fit(x, data.target), "predict_proba") is None
