"""Reference answers: an example model run by scikit-learn itself, without modelserve."""

from pathlib import Path
from typing import Any

import joblib


def fitted_example(repository: Path, name: str) -> Any:
    """The fitted estimator of version 1 (joblib) of the example `name`, loaded as its user
    would load it. Version 2 is its ONNX export, so it answers the same within float32."""
    return joblib.load(repository / name / "1" / "model.joblib")
