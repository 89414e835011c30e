"""scikit-learn forests evaluated tree by tree in a plain loop, without joblib.

A forest's own predict_proba/predict hands every tree to joblib, even with n_jobs=1, at
about 50 µs a tree: a 100-tree forest spends ~5 ms a call there, several times what its
trees cost on a batch of a few hundred rows. Summing the same trees' outputs in the same
order gives the same numbers at a fraction of the cost. Used only after a load-time check
that it agrees with the forest's own method.
"""

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)

logger = logging.getLogger(__name__)

Call = Callable[[NDArray[Any]], NDArray[Any]]

# Exact types: a subclass may override the method this replaces.
_CLASSIFIERS = (RandomForestClassifier, ExtraTreesClassifier)
_REGRESSORS = (RandomForestRegressor, ExtraTreesRegressor)
# Differences a different summation order (n_jobs > 1 in scikit-learn) could make.
_TOLERANCE = 1e-9


class _TreeAverage:
    """The mean of the trees' outputs, accumulated in float64 as scikit-learn does."""

    def __init__(self, forest: Any, method: str, width: int | None) -> None:
        self._calls = [getattr(tree, method) for tree in forest.estimators_]
        self._width = width

    def __call__(self, features: NDArray[Any]) -> NDArray[np.float64]:
        # Trees skip input checks (check_input=False) only on C-ordered float32.
        with np.errstate(over="ignore"):  # overflow to infinity is refused just below
            rows = np.ascontiguousarray(features, dtype=np.float32)
        # The forest's own check lets NaN through (trees route it) but refuses infinity.
        if np.isinf(rows).any():
            raise ValueError("Input X contains infinity or a value too large for float32")
        shape = (len(rows),) if self._width is None else (len(rows), self._width)
        total = np.zeros(shape, dtype=np.float64)
        for call in self._calls:
            total += call(rows, check_input=False)
        total /= len(self._calls)
        return total


def tree_loop(estimator: Any, method: str) -> Call | None:
    """`estimator.<method>` computed tree by tree, or None where that does not apply.

    Applies to single-output random forests and extra-trees, alone or as a Pipeline's last
    step, for predict_proba (classifiers) and predict (regressors).
    """
    steps = getattr(estimator, "steps", None)
    final = steps[-1][1] if steps else estimator
    if steps and len(steps) == 1:
        steps = None  # a one-step Pipeline transforms nothing first
    if getattr(final, "n_outputs_", None) != 1 or not hasattr(final, "estimators_"):
        return None
    if type(final) in _CLASSIFIERS and method == "predict_proba":
        average = _TreeAverage(final, method, int(final.n_classes_))
    elif type(final) in _REGRESSORS and method == "predict":
        average = _TreeAverage(final, method, None)
    else:
        return None
    call: Call = average
    if steps:
        head = estimator[:-1]  # the transforming steps, sliced once

        def call(features: NDArray[Any]) -> NDArray[Any]:
            return average(head.transform(features))

    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int):
        return None
    probe = np.random.default_rng(0).normal(size=(16, n_features)).astype(np.float32)
    try:
        agrees = np.allclose(
            call(probe), getattr(estimator, method)(probe), rtol=0, atol=_TOLERANCE
        )
    except Exception:  # whatever the loop cannot handle, the estimator's own method does
        logger.debug("tree loop check failed for %s", type(final).__name__, exc_info=True)
        return None
    if not agrees:
        logger.warning(
            "%s: the tree loop disagrees with %s; keeping the estimator's own",
            type(final).__name__,
            method,
        )
        return None
    return call
