"""scikit-learn estimators and Pipelines loaded from joblib or pickle artifacts."""

import io
import logging
import platform
import warnings
from collections.abc import Callable
from typing import Any

import joblib
import numpy as np
import sklearn
from numpy.typing import NDArray

from service.errors import ModelLoadError
from service.store.calls import calling
from service.store.metadata import ArtifactMetadata
from service.store.runtimes import (
    Arrays,
    Prediction,
    Runtime,
    RuntimeOptions,
    Signature,
    signature_of,
)
from service.store.runtimes.feature_names import array_ready
from service.store.runtimes.forest import tree_loop
from service.store.runtimes.linear import linear_call
from service.store.tensors import TensorSpec, datatype_of

logger = logging.getLogger(__name__)

# Estimators whose predict() is the class of the highest probability of predict_proba(): the
# argmax of the same probabilities (trees, forests, k-NN), or of scores that predict_proba()
# maps to probabilities in the same order (linear models, boosting, naive Bayes, networks), so
# one call serves both. The same order up to rounding: where two classes' scores nearly tie,
# the mapping can round them to one probability, or order them otherwise; rows whose two
# highest probabilities are within TIE_MARGIN (relative) of each other are given to predict().
_LABEL_FROM_PROBA = {
    "DecisionTreeClassifier",
    "ExtraTreeClassifier",
    "ExtraTreesClassifier",
    "GaussianNB",
    "GradientBoostingClassifier",
    "HistGradientBoostingClassifier",
    "KNeighborsClassifier",
    "LogisticRegression",
    "MLPClassifier",
    "RandomForestClassifier",
}
TIE_MARGIN = 1e-9


def framework_versions() -> dict[str, str]:
    return {
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "joblib": joblib.__version__,
        "python": platform.python_version(),
    }


def _final_step(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[-1][1] if steps else estimator


def _read(data: bytes) -> Any:
    with warnings.catch_warnings():
        # A version mismatch is reported from the metadata, with its model's name, instead.
        warnings.simplefilter("ignore", category=UserWarning)
        return joblib.load(io.BytesIO(data))


def describe_estimator(estimator: Any) -> Signature:
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int):
        raise ModelLoadError(
            f"{type(estimator).__name__} has no n_features_in_: is it a fitted estimator?",
            reason="unsupported_artifact",
        )
    names = getattr(estimator, "feature_names_in_", None)
    features = (
        [str(n) for n in names] if names is not None else [f"x{i}" for i in range(n_features)]
    )
    inputs = [TensorSpec(name="input", datatype="FP32", shape=[-1, n_features])]
    classes = getattr(estimator, "classes_", None)
    if classes is not None and hasattr(estimator, "predict_proba"):
        labels = np.asarray(classes)
        return Signature(
            task="classification",
            inputs=inputs,
            outputs=[
                TensorSpec(name="label", datatype=datatype_of(labels.dtype), shape=[-1]),
                TensorSpec(name="probabilities", datatype="FP32", shape=[-1, len(labels)]),
            ],
            features=features,
            classes=[c.item() if isinstance(c, np.generic) else c for c in labels],
        )
    if classes is not None:
        labels = np.asarray(classes)
        return Signature(
            task="classification",
            inputs=inputs,
            outputs=[TensorSpec(name="label", datatype=datatype_of(labels.dtype), shape=[-1])],
            features=features,
            classes=[c.item() if isinstance(c, np.generic) else c for c in labels],
        )
    return Signature(
        task="regression",
        inputs=inputs,
        outputs=[TensorSpec(name="prediction", datatype="FP32", shape=[-1])],
        features=features,
    )


def describe(data: bytes) -> Signature:
    return describe_estimator(_read(data))


class SklearnRuntime:
    format = "sklearn"

    def __init__(
        self, estimator: Any, signature: Signature, model: tuple[str, int] | None = None
    ) -> None:
        self._estimator = estimator
        self._model = model
        self.signature = signature
        self._input = signature.inputs[0].name
        names = {o.name for o in signature.outputs}
        self._want_proba = "probabilities" in names
        self._label_from_proba = (
            self._want_proba and type(_final_step(estimator)).__name__ in _LABEL_FROM_PROBA
        )
        self._classes: NDArray[Any] = np.asarray(getattr(estimator, "classes_", []))
        # Label positions are only meaningful in the order the signature lists the classes,
        # and with the same types (0 == 0.0 == False, but their labels differ).
        classes, listed = self._classes.tolist(), signature.classes or []
        self._index_labels = (
            self._label_from_proba
            and classes == listed
            and [type(c) for c in classes] == [type(c) for c in listed]
        )
        self._regression = signature.task == "regression"
        # A model fitted on a DataFrame, made ready for arrays (the runtime owns the estimator:
        # the names it recorded may be removed).
        called = array_ready(estimator)
        self._predict = self._fastest(called, "predict")
        self._predict_proba = self._fastest(called, "predict_proba") if self._want_proba else None

    @staticmethod
    def _fastest(estimator: Any, method: str) -> Callable[[NDArray[Any]], Any]:
        """The method, computed without scikit-learn's per-call overhead where a way to is
        known and agrees with it."""
        own: Callable[[NDArray[Any]], Any] = getattr(estimator, method)
        return tree_loop(estimator, method) or linear_call(estimator, method) or own

    def predict(self, inputs: Arrays) -> Prediction:
        calling.model = self._model
        try:
            return self._predict_rows(inputs[self._input])
        finally:
            calling.model = None

    def _predict_rows(self, features: NDArray[Any]) -> Prediction:
        if self._regression:
            values = np.asarray(self._predict(features))
            return Prediction(
                {"prediction": values.reshape(len(features), -1)[:, 0].astype(np.float32)}
            )
        if self._predict_proba is None:
            return Prediction({"label": np.asarray(self._predict(features))})
        exact = np.asarray(self._predict_proba(features))
        proba = exact.astype(np.float32, order="C")
        if not self._label_from_proba:
            label = np.asarray(self._predict(features))
            return Prediction({"label": label, "probabilities": proba})
        # From the unrounded values, as predict() does: FP32 rounding can tie close classes.
        index = self._highest(features, exact)
        outputs = {"label": self._classes.take(index), "probabilities": proba}
        return Prediction(outputs, index if self._index_labels else None)

    def _highest(self, features: NDArray[Any], exact: NDArray[Any]) -> NDArray[np.intp]:
        """Each row's class position in classes_, as predict() gives it: the highest
        probability's (the first of equals, as argmax), or predict()'s near a tie."""
        columns = np.ascontiguousarray(exact.T)  # a pass per class beats argmax along rows
        best = columns[0].copy()
        index = np.zeros(len(best), dtype=np.intp)
        for position, column in enumerate(columns[1:], start=1):
            index[column > best] = position
            np.maximum(best, column, out=best)  # NaN anywhere in a row makes its best NaN
        near = columns >= best * (1 - TIE_MARGIN)
        if np.count_nonzero(near) > len(best) or np.isnan(best).any():
            rows = np.flatnonzero((np.count_nonzero(near, axis=0) > 1) | np.isnan(best))
            positions = {c: i for i, c in enumerate(self._classes.tolist())}
            labels = np.asarray(self._predict(features[rows])).tolist()
            index[rows] = [positions[label] for label in labels]
        return index


def load(data: bytes, metadata: ArtifactMetadata | None, options: RuntimeOptions) -> Runtime:
    made_with = metadata.framework.get("scikit-learn") if metadata else None
    if made_with and made_with != sklearn.__version__:
        message = (
            f"made with scikit-learn {made_with}, this server runs "
            f"{sklearn.__version__}; predictions may differ"
        )
        if options.strict_versions:
            raise ModelLoadError(
                message + " (MODELSERVE_STRICT_VERSIONS=true)", reason="version_mismatch"
            )
        logger.warning(message)
    estimator = _read(data)
    if not hasattr(estimator, "predict"):
        raise ModelLoadError(
            f"the artifact holds a {type(estimator).__name__}, not an estimator",
            reason="unsupported_artifact",
        )
    signature = signature_of(metadata) if metadata else describe_estimator(estimator)
    return SklearnRuntime(estimator, signature, options.model)
