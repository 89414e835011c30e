"""Misbehaving models for the fault tests, packaged into a repository like any user's model.

Artifacts pickle a reference to these classes, so a server that loads them imports this
module: its process needs the repository root on sys.path (see `fault_env`).
"""

import time
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_iris
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from service.store.metadata import Task
from service.store.packaging import package_artifact

IRIS = load_iris()
# A feature value that makes FailingClassifier raise; the load-time smoke test sends zeros.
POISON = 13.0
SLOW_SECONDS = 0.5


def _fitted_iris() -> LogisticRegression:
    return LogisticRegression(max_iter=1000).fit(IRIS.data, IRIS.target)


class _Wrapped:
    """A fitted classifier seen through a wrapper, with the attributes packaging reads."""

    def __init__(self, inner: LogisticRegression) -> None:
        self.inner = inner
        self.n_features_in_ = inner.n_features_in_
        self.classes_ = inner.classes_

    def predict(self, x: NDArray[np.float32]) -> NDArray[Any]:
        labels: NDArray[Any] = self.inner.predict(x)
        return labels

    def predict_proba(self, x: NDArray[np.float32]) -> NDArray[np.float64]:
        proba: NDArray[np.float64] = self.inner.predict_proba(x)
        return proba


class SlowClassifier(_Wrapped):
    """Sleeps on every call, to hold requests in flight (overload, deadlines, shutdown)."""

    def predict_proba(self, x: NDArray[np.float32]) -> NDArray[np.float64]:
        time.sleep(SLOW_SECONDS)
        return super().predict_proba(x)


class FailingClassifier(_Wrapped):
    """Raises, as a buggy model would, when a feature equals POISON."""

    def predict_proba(self, x: NDArray[np.float32]) -> NDArray[np.float64]:
        if (x == POISON).any():
            raise ValueError("this model cannot handle the value 13")
        return super().predict_proba(x)


class ModelWarning(UserWarning):
    """What WarningClassifier warns."""


class WarningClassifier(_Wrapped):
    """Warns on every call, as a model with a deprecated or drifting part might; the text
    changes with the number of rows."""

    def predict_proba(self, x: NDArray[np.float32]) -> NDArray[np.float64]:
        warnings.warn(f"{len(x)} rows scored by an uncalibrated model", ModelWarning, stacklevel=1)
        return super().predict_proba(x)


class NonFiniteRegressor:
    """Returns NaN for rows whose first feature is 1, +inf for 2, -inf for 3, else the sum."""

    n_features_in_ = 4

    def predict(self, x: NDArray[np.float32]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = x.sum(axis=1).astype(np.float64)
        first = x[:, 0]
        out[first == 1] = np.nan
        out[first == 2] = np.inf
        out[first == 3] = -np.inf
        return out


def touch_marker(path: str) -> None:
    Path(path).touch()


class MarkerOnUnpickle:
    """An artifact whose mere unpickling creates a file: code execution made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (touch_marker, (self.marker,))


def add_fault_models(root: Path, workdir: Path) -> None:
    """Package the misbehaving models into `root` with `modelserve package` semantics."""
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    models: list[tuple[str, object, Task]] = [
        ("slow", SlowClassifier(_fitted_iris()), "classification"),
        ("slow_alone", SlowClassifier(_fitted_iris()), "classification"),
        ("failing", FailingClassifier(_fitted_iris()), "classification"),
        ("nonfinite", NonFiniteRegressor(), "regression"),
    ]
    for name, model, task in models:
        artifact = workdir / f"{name}.joblib"
        joblib.dump(model, artifact)
        package_artifact(artifact, root, name, 1, features=features, task=task)
    # With batching off, each request is a call of its own.
    (root / "slow_alone" / "model.toml").write_text("[batching]\nmax_batch_rows = 0\n")
    # A model that takes missing values (HistGradientBoosting routes NaN), packaged to say so.
    artifact = workdir / "gaps.joblib"
    joblib.dump(fitted_with_gaps(), artifact)
    package_artifact(artifact, root, "gaps", 1, features=features, allow_nan=True)


def fitted_with_gaps() -> HistGradientBoostingClassifier:
    rows = IRIS.data.copy()
    rows[::7, 1] = np.nan  # trained on missing values, so a missing one has a learned branch
    return HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(rows, IRIS.target)
