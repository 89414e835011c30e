"""Estimators fitted on a pandas DataFrame, made to take the plain arrays the server has.

scikit-learn records the columns an estimator was fitted on (`feature_names_in_`) and warns
"X does not have valid feature names" on every call with an array. Which of two ways is
taken is decided once, at load time:

- Where the recorded names sit only where the input itself arrives (the estimator, or the
  first step of a Pipeline), they serve nothing but that check: they are removed, after a
  check on probe rows that arrays then give what a DataFrame gave. No cost per call.
- Elsewhere (a ColumnTransformer that selects columns by name, steps that hand DataFrames
  on), the model is called with a DataFrame of its columns, as it was fitted.
"""

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.base import BaseEstimator

logger = logging.getLogger(__name__)

NAMES = "feature_names_in_"
METHODS = ("predict", "predict_proba")


class Framed:
    """Calls an estimator with a DataFrame of the columns it was fitted on."""

    def __init__(self, estimator: Any, columns: list[str]) -> None:
        import pandas as pd  # only models fitted on DataFrames need it

        self._estimator = estimator
        self._dataframe = pd.DataFrame
        self._columns = pd.Index(columns)

    def frame(self, rows: NDArray[Any]) -> Any:
        return self._dataframe(rows, columns=self._columns, copy=False)

    def predict(self, rows: NDArray[Any]) -> Any:
        return self._estimator.predict(self.frame(rows))

    def predict_proba(self, rows: NDArray[Any]) -> Any:
        return self._estimator.predict_proba(self.frame(rows))


def array_ready(estimator: Any) -> Any:
    """`estimator` (its recorded names removed if need be), or a Framed stand-in for it."""
    names = getattr(estimator, NAMES, None)
    if names is None:
        return estimator
    columns = [str(c) for c in names]
    try:
        framed = Framed(estimator, columns)
    except ImportError:
        framed = None
    if _unname(estimator, framed, len(columns)):
        return estimator
    if framed is None:
        logger.warning(
            "%s was fitted on a DataFrame and needs pandas to be called without warnings",
            type(estimator).__name__,
        )
        return estimator
    return framed


def _unname(estimator: Any, framed: Framed | None, width: int) -> bool:
    """Removes the recorded names if that is safe; False (names kept) if it is not."""
    entry = _entry(estimator)
    holders = [part for part in _parts(estimator) if NAMES in vars(part)]
    if not all(any(holder is e for e in entry) for holder in holders):
        return False
    methods = [m for m in METHODS if hasattr(estimator, m)]
    probe = np.vstack([np.zeros((1, width)), np.random.default_rng(0).random((7, width))])
    probe = probe.astype(np.float32)
    expected = None
    if framed is not None:
        try:
            expected = [np.asarray(getattr(framed, m)(probe)) for m in methods]
        except Exception:  # the model cannot answer the probe: keep calling it as it was fitted
            logger.debug("probe failed for %s", type(estimator).__name__, exc_info=True)
            return False
    removed = [(holder, vars(holder).pop(NAMES)) for holder in holders]
    try:
        actual = [np.asarray(getattr(estimator, m)(probe)) for m in methods]
        same = expected is None or all(map(_same, expected, actual))
    except Exception:  # arrays do not work without the names
        logger.debug("%s needs its feature names", type(estimator).__name__, exc_info=True)
        same = False
    if not same:
        for holder, names in removed:
            setattr(holder, NAMES, names)
    return same


def _same(a: NDArray[Any], b: NDArray[Any]) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _entry(estimator: Any) -> list[Any]:
    """The estimator and, for Pipelines, the first steps: what the input reaches as it is."""
    chain = [estimator]
    while steps := getattr(chain[-1], "steps", None):
        first = next((step for _, step in steps if step not in (None, "passthrough")), None)
        if first is None:
            break
        chain.append(first)
    return chain


def _parts(root: Any) -> Iterator[Any]:
    """Every estimator inside `root` (steps, transformers, ensemble members), `root` too."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, np.ndarray) and item.dtype == object:
            stack.extend(item.ravel().tolist())
        elif isinstance(item, BaseEstimator):
            yield item
            stack.extend(vars(item).values())
