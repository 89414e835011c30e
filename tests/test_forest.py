"""Forests evaluated tree by tree give the forest's own answers."""

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import (
    ExtraTreesClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import (
    DecisionTreeClassifier,
    DecisionTreeRegressor,
    ExtraTreeClassifier,
    ExtraTreeRegressor,
)

from service.store.runtimes.forest import tree_loop
from service.store.runtimes.sklearn import SklearnRuntime, describe_estimator


def _cancer() -> tuple[NDArray[np.float32], NDArray[Any]]:
    data = load_breast_cancer()
    names = np.array(["malignant", "benign"])
    return data.data.astype(np.float32), names[data.target]


def _rows(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Rows the forest has not seen: training rows with noise, as a contiguous block."""
    noise = np.random.default_rng(1).normal(scale=0.05, size=x.shape).astype(np.float32)
    return x * (1 + noise)


@pytest.mark.parametrize(
    "estimator",
    [
        RandomForestClassifier(n_estimators=25, random_state=0),
        ExtraTreesClassifier(n_estimators=25, random_state=0),
        make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=25, random_state=0)),
        DecisionTreeClassifier(random_state=0),  # a single tree is a forest of one
        ExtraTreeClassifier(random_state=0),
        make_pipeline(StandardScaler(), DecisionTreeClassifier(max_depth=4, random_state=0)),
    ],
    ids=["random-forest", "extra-trees", "pipeline", "tree", "extra-tree", "tree-pipeline"],
)
def test_classifier_runtime_gives_the_forests_own_answers(estimator: Any) -> None:
    x, y = _cancer()
    estimator.fit(x, y)
    assert tree_loop(estimator, "predict_proba") is not None
    runtime = SklearnRuntime(estimator, describe_estimator(estimator))
    rows = _rows(x)
    prediction = runtime.predict({"input": rows})
    outputs = prediction.outputs
    expected = estimator.predict_proba(rows)
    assert np.array_equal(outputs["probabilities"], expected.astype(np.float32))
    assert outputs["label"].tolist() == estimator.predict(rows).tolist()
    assert np.array_equal(
        runtime.predict({"input": rows[:1]}).outputs["probabilities"][0],
        outputs["probabilities"][0],
    )
    classes = np.asarray(runtime.signature.classes)
    assert prediction.label_index is not None
    assert classes[prediction.label_index].tolist() == outputs["label"].tolist()


def test_regressor_loop_is_exact() -> None:
    data = load_diabetes()
    x = data.data.astype(np.float32)
    forest = RandomForestRegressor(n_estimators=25, random_state=0).fit(x, data.target)
    loop = tree_loop(forest, "predict")
    assert loop is not None
    rows = _rows(x)
    assert np.array_equal(loop(rows), forest.predict(rows))
    runtime = SklearnRuntime(forest, describe_estimator(forest))
    predicted = runtime.predict({"input": rows}).outputs["prediction"]
    assert np.array_equal(predicted, forest.predict(rows).astype(np.float32))


def test_parallel_forests_agree_within_summation_order() -> None:
    x, y = _cancer()
    forest = RandomForestClassifier(n_estimators=40, n_jobs=2, random_state=0).fit(x, y)
    loop = tree_loop(forest, "predict_proba")
    assert loop is not None
    rows = _rows(x)
    np.testing.assert_allclose(loop(rows), forest.predict_proba(rows), rtol=0, atol=1e-12)


class _Calibrated(RandomForestClassifier):  # type: ignore[misc]  # untyped base
    """A subclass may change what predict_proba means; the loop must not stand in for it."""

    def predict_proba(self, X: Any) -> Any:
        return np.sqrt(super().predict_proba(X))


def test_loop_is_not_used_where_it_would_differ() -> None:
    x, y = _cancer()
    assert tree_loop(_Calibrated(n_estimators=5, random_state=0).fit(x, y), "predict_proba") is None
    two_outputs = np.stack([load_diabetes().target[:100]] * 2, axis=1)
    multi = RandomForestRegressor(n_estimators=5, random_state=0).fit(x[:100], two_outputs)
    assert tree_loop(multi, "predict") is None
    classifier = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    assert tree_loop(classifier, "predict") is None  # labels come from the probabilities
    runtime = SklearnRuntime(
        _Calibrated(n_estimators=5, random_state=0).fit(x, y), describe_estimator(classifier)
    )
    rows = _rows(x)
    assert np.array_equal(
        runtime.predict({"input": rows}).outputs["probabilities"],
        np.sqrt(
            RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y).predict_proba(rows)
        ).astype(np.float32),
    )


def test_infinity_is_refused_as_the_forest_refuses_it() -> None:
    x, y = _cancer()
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    loop = tree_loop(forest, "predict_proba")
    assert loop is not None
    rows = _rows(x[:3]).astype(np.float64)
    rows[1, 2] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        forest.predict_proba(rows)
    with pytest.raises(ValueError, match="infinity"):
        loop(rows)
    rows[1, 2] = 1e39  # finite in float64, infinite once cast to the trees' float32
    with pytest.raises(ValueError, match="infinity"):
        loop(rows)


def test_one_step_pipeline_uses_the_loop() -> None:
    x, y = _cancer()
    pipeline = make_pipeline(RandomForestClassifier(n_estimators=5, random_state=0)).fit(x, y)
    loop = tree_loop(pipeline, "predict_proba")
    assert loop is not None
    assert np.array_equal(loop(_rows(x)), pipeline.predict_proba(_rows(x)))


@pytest.mark.parametrize("width", [29, 31])
def test_rows_of_another_width_are_refused_as_the_forest_refuses_them(width: int) -> None:
    # Trees read their input's columns unchecked: a narrow row must not be read past its end.
    x, y = _cancer()
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    loop = tree_loop(forest, "predict_proba")
    assert loop is not None
    rows = np.resize(_rows(x[:3]), (3, width))
    with pytest.raises(ValueError, match=f"X has {width} features"):
        forest.predict_proba(rows)
    with pytest.raises(ValueError, match=f"X has {width} features, but RandomForestClassifier"):
        loop(rows)


@pytest.mark.parametrize("tree", [DecisionTreeRegressor, ExtraTreeRegressor])
def test_a_single_regression_tree_gives_its_own_values(tree: Any) -> None:
    data = load_diabetes()
    x = data.data.astype(np.float32)
    model = tree(random_state=0).fit(x, data.target)
    loop = tree_loop(model, "predict")
    assert loop is not None
    assert np.array_equal(loop(_rows(x)), model.predict(_rows(x)))


@pytest.mark.parametrize(
    "estimator",
    [
        DecisionTreeClassifier(random_state=0),
        ExtraTreeClassifier(random_state=0),
        RandomForestClassifier(n_estimators=5, random_state=0),
    ],
    ids=["decision-tree", "extra-tree", "random-forest"],
)
def test_nan_is_routed_as_the_estimator_routes_it(estimator: Any) -> None:
    """scikit-learn's trees take missing values (a model packaged with --allow-nan gets them):
    the loop sends a NaN down the branch the tree's own method sends it."""
    x, y = _cancer()
    missing = x.copy()
    missing[::3, 7] = np.nan  # learned from, so the splits have a side for missing values
    estimator.fit(missing, y)
    loop = tree_loop(estimator, "predict_proba")
    assert loop is not None
    rows = _rows(x)
    rows[::2, 7] = np.nan
    rows[1::4, 20] = np.nan
    assert np.array_equal(loop(rows), estimator.predict_proba(rows))
