"""Estimators fitted on DataFrames answer arrays as they answer DataFrames, without warnings.

The suite turns every warning into an error, so a feature-name warning fails these tests.
"""

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import (
    GradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.store.runtimes.feature_names import array_ready
from service.store.runtimes.sklearn import SklearnRuntime, describe_estimator

IRIS = load_iris(as_frame=True)
DIABETES = load_diabetes(as_frame=True)


def _classifiers() -> dict[str, Any]:
    first_two = list(IRIS.data.columns[:2])
    return {
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "forest": RandomForestClassifier(n_estimators=10, random_state=0),
        "boosting": GradientBoostingClassifier(n_estimators=5, random_state=0),
        # Selects columns by name: only a DataFrame can serve it.
        "columns_by_name": make_pipeline(
            ColumnTransformer([("s", StandardScaler(), first_two)], remainder="passthrough"),
            LogisticRegression(max_iter=1000),
        ),
        # Hands DataFrames from step to step, so later steps hold names too.
        "pandas_output": make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000)
        ).set_output(transform="pandas"),
    }


@pytest.mark.parametrize("name", list(_classifiers()))
def test_a_classifier_fitted_on_a_dataframe_takes_arrays(name: str) -> None:
    model = _classifiers()[name].fit(IRIS.data, IRIS.target)
    frame = IRIS.data.astype(np.float32)
    expected_label = model.predict(frame)
    expected_proba = model.predict_proba(frame).astype(np.float32)
    runtime = SklearnRuntime(model, describe_estimator(model))
    outputs = runtime.predict({"input": frame.to_numpy()}).outputs
    np.testing.assert_array_equal(outputs["label"], expected_label)
    np.testing.assert_array_equal(outputs["probabilities"], expected_proba)
    assert runtime.signature.features == list(IRIS.data.columns)


def test_a_forest_regressor_in_a_pipeline_fitted_on_a_dataframe_takes_arrays() -> None:
    model = make_pipeline(StandardScaler(), RandomForestRegressor(n_estimators=10, random_state=0))
    model.fit(DIABETES.data, DIABETES.target)
    frame = DIABETES.data.astype(np.float32)
    expected = model.predict(frame).astype(np.float32)
    runtime = SklearnRuntime(model, describe_estimator(model))
    outputs = runtime.predict({"input": frame.to_numpy()}).outputs
    np.testing.assert_array_equal(outputs["prediction"], expected)


def test_a_model_fitted_on_arrays_is_called_as_it_is() -> None:
    model = LogisticRegression(max_iter=1000).fit(IRIS.data.to_numpy(), IRIS.target)
    assert array_ready(model) is model


def test_the_frame_keeps_the_fitted_column_names() -> None:
    columns = list(IRIS.data.columns[:2])
    model = make_pipeline(
        ColumnTransformer([("s", StandardScaler(), columns)], remainder="drop"),
        LogisticRegression(max_iter=1000),
    ).fit(IRIS.data, IRIS.target)
    ready = array_ready(model)
    rows = IRIS.data.to_numpy(dtype=np.float32)[:10]
    np.testing.assert_array_equal(
        ready.predict(rows), model.predict(pd.DataFrame(rows, columns=IRIS.data.columns))
    )
