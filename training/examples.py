"""The example models: iris, breast_cancer and diabetes, each as a joblib and an ONNX version.

`IRIS_INTEGER` is iris trained on the dataset's integer targets (0, 1, 2) rather than the
species names: the benchmark's model whose answers carry no strings.
"""

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from numpy.typing import NDArray
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn import datasets
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.store.metadata import Task
from service.store.packaging import package_artifact
from service.store.profiles import profile_version
from service.store.samples import store_reference_sample

logger = logging.getLogger(__name__)
SEED = 0


@dataclass(frozen=True)
class Example:
    name: str
    task: Task
    load: Callable[[], Any]
    build: Callable[[], Any]
    # The dataset's own class numbers as labels (INT64), instead of its class names (BYTES).
    integer_labels: bool = False
    dataset: str = ""

    @property
    def source(self) -> str:
        return f"sklearn.datasets.load_{self.dataset or self.name}"


def _feature_name(raw: str) -> str:
    return raw.replace(" (cm)", "").replace(" ", "_").lower()


EXAMPLES = [
    Example(
        "iris",
        "classification",
        lambda: datasets.load_iris(),
        lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    ),
    Example(
        "breast_cancer",
        "classification",
        lambda: datasets.load_breast_cancer(),
        lambda: RandomForestClassifier(n_estimators=100, random_state=SEED, n_jobs=1),
    ),
    Example(
        "diabetes",
        "regression",
        lambda: datasets.load_diabetes(),
        lambda: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
    ),
]
IRIS_INTEGER = Example(
    "iris_int",
    "classification",
    lambda: datasets.load_iris(),
    lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    integer_labels=True,
    dataset="iris",
)
VERSIONS = {1: "model.joblib", 2: "model.onnx"}


def examples_missing(root: Path) -> bool:
    return any(
        not (root / e.name / str(v) / "metadata.json").is_file() for e in EXAMPLES for v in VERSIONS
    )


def _dataset(example: Example) -> tuple[NDArray[np.float32], NDArray[Any], list[str]]:
    bunch = example.load()
    features = [_feature_name(str(f)) for f in bunch.feature_names]
    X = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target)
    if example.task == "classification" and not example.integer_labels:
        y = np.asarray(bunch.target_names)[y]  # string labels, served as BYTES
    return X, y, features


def train_example(example: Example, root: Path) -> None:
    X, y, features = _dataset(example)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=SEED)
    model = example.build().fit(X_train, y_train)
    predicted = model.predict(X_test)
    score = (
        accuracy_score(y_test, predicted)
        if example.task == "classification"
        else r2_score(y_test, predicted)
    )
    training = {
        "dataset": example.source,
        "seed": SEED,
        "test_size": 0.25,
        "rows": len(X),
        "metrics": {
            "accuracy" if example.task == "classification" else "r2": round(float(score), 4)
        },
    }
    onnx_options = {id(model): {"zipmap": False}} if example.task == "classification" else None
    onx = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
        options=onnx_options,
        target_opset=17,
    )
    with tempfile.TemporaryDirectory() as tmp:
        pickled = Path(tmp) / "model.joblib"
        joblib.dump(model, pickled)
        exported = Path(tmp) / "model.onnx"
        exported.write_bytes(onx.SerializeToString())
        for version, artifact in ((1, pickled), (2, exported)):
            package_artifact(
                artifact,
                root,
                example.name,
                version,
                features=features,
                task=example.task,
                training=training,
                replace=True,
            )
            # Rows a conversion of this version is checked on (`modelserve convert`).
            folder = root / example.name / str(version)
            store_reference_sample(folder, X_train)
            # What live drift is measured against: the same training rows, and their predictions.
            profile_version(folder, X_train, allow_unverified_pickle=False)
    logger.info("trained %s: %s", example.name, training["metrics"])


def train_examples(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for example in EXAMPLES:
        train_example(example, root)
