"""The load-time check that a faster way of computing an estimator's method gives its answers."""

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

Call = Callable[[NDArray[Any]], NDArray[Any]]

# Differences a different summation order (n_jobs > 1 in scikit-learn) could make.
TOLERANCE = 1e-9


def agreeing(call: Call, own: Call, n_features: int, dtypes: tuple[type, ...], what: str) -> bool:
    """Whether `call` gives what `own` gives, to TOLERANCE, on random rows of each dtype.

    Logged (and False) where it does not or raises: the estimator's own method then serves.
    """
    probe = np.random.default_rng(0).normal(size=(64, n_features))
    probes: list[NDArray[Any]] = [probe.astype(dtype) for dtype in dtypes]
    try:
        agrees = all(np.allclose(call(rows), own(rows), rtol=0, atol=TOLERANCE) for rows in probes)
    except Exception:  # whatever the faster way cannot handle, the estimator's own method does
        logger.debug("%s: check failed", what, exc_info=True)
        return False
    if not agrees:
        logger.warning("%s disagrees with the estimator's own; keeping the estimator's", what)
    return agrees
